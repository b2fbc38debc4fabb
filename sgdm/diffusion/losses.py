"""The denoising objective (DDPM Eq. 14 / LDM Eq. 2), per sample.

L(x_0, t, eps) = || target - f_theta(x_t, t) ||_p, averaged over the non-batch
dimensions, with x_t = q_sample(x_0, t, eps) and target = eps (eps-prediction)
or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (v-prediction), p = 2
(squared) or 1. The loss is returned per sample ([B]) so that the trainer can
weight it or log it by timestep quartile.
"""
from __future__ import annotations

from typing import Callable

import torch

from sgdm.diffusion.config import DiffusionConfig
from sgdm.diffusion.schedule import NoiseSchedule, q_sample, v_target

__all__ = ["diffusion_loss", "sample_timesteps"]


def sample_timesteps(batch_size: int, num_timesteps: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1}, [batch_size] int64, drawn from ``generator`` (on its device) then moved."""
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=gen_device)
    return t.to(device)


def diffusion_loss(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule,
                   cfg: DiffusionConfig) -> torch.Tensor:
    """Per-sample loss [B].

    model_fn(x_t [B, C, h, w], t [B] int64) -> prediction like x_t (eps or v, as
    ``cfg.parameterization`` says; any conditioning is bound inside model_fn).
    x0: clean (latent) data [B, C, h, w]; t: [B] timesteps; noise: eps like x0.
    """
    x_t = q_sample(schedule, x0, t, noise)
    target = noise if cfg.parameterization == "eps" else v_target(schedule, x0, t, noise)
    pred = model_fn(x_t, t)
    if pred.shape != target.shape:
        raise ValueError(f"model_fn: expected an output of shape {tuple(target.shape)}, got {tuple(pred.shape)}")
    diff = pred.float() - target.float()
    per_elem = diff.abs() if cfg.loss == "l1" else diff.square()
    return per_elem.flatten(1).mean(1)
