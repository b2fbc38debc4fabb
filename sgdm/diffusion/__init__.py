"""Diffusion maths: noise schedule, training loss, samplers, classifier-free guidance.

One concept per module: ``config`` (DiffusionConfig, SamplerConfig; no torch
import, so configs validate fast), ``schedule`` (NoiseSchedule, q_sample),
``losses`` (diffusion_loss), ``samplers`` (DDIM, DDPM, DPM-Solver++(2M) as
functions of a denoiser), ``guidance`` (paper Eq. 4 wrapper), ``noise``
(per-sample generators). Names below are imported lazily.
"""
from __future__ import annotations

from sgdm._lazy import lazy_attributes

_LAZY = {
    "DiffusionConfig": "config", "SamplerConfig": "config",
    "ClassifierFreeGuidance": "guidance", "GuidedEps": "guidance", "guided_eps": "guidance",
    "diffusion_loss": "losses", "sample_timesteps": "losses",
    "resolve_eps": "guidance",
    "randn": "noise", "randn_like": "noise",
    "ddim_timesteps": "samplers", "get_sampler": "samplers", "sample_ddim": "samplers",
    "sample_ddpm": "samplers", "sample_dpmpp_2m": "samplers", "sampling_timesteps": "samplers",
    "logsnr_timesteps": "samplers", "SPACINGS": "samplers", "DEFAULT_SPACING": "samplers",
    "NoiseSchedule": "schedule", "make_schedule": "schedule", "q_sample": "schedule",
    "eps_from_output": "schedule", "v_target": "schedule",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, {k: f"sgdm.diffusion.{v}" for k, v in _LAZY.items()})
