"""Classifier-free guidance in the paper's convention (Hu et al. 2023, Eq. 4).

    eps~(x_t, k) = (1 - w) eps(x_t, null) + w eps(x_t, k)

w = 0 is the unconditional model, w = 1 the conditional one, w > 1 extrapolates
past it. This is the same as the other common form eps_uncond + s (eps_cond -
eps_uncond) with s = w (Ho & Salimans write (1 + w') eps_cond - w' eps_uncond,
i.e. w' = w - 1). The null condition is all zeros, which is what training's
guidance dropout substitutes (``sgdm.models.conditioning.drop_guidance``).

The wrapper here turns a conditional network into a denoiser ``denoise(x, t)``
for the samplers. It evaluates the conditional and unconditional halves in ONE
network call (concatenated along the batch) and returns them unmixed as a
:class:`GuidedEps`, so the DDIM sampler can hand both to the fused
``sgdm.ops.guided_ddim_step`` and the other samplers mix with :meth:`GuidedEps.mix`.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional, Union

import torch

from sgdm.models.conditioning import null_condition

__all__ = ["GuidedEps", "ClassifierFreeGuidance", "guided_eps", "resolve_eps", "EpsModel"]

# eps_model(x_t [B,C,h,w], t [B] int64, cond [B,cond_dim] | None, cond_map [B,c,H,W] | None) -> eps [B,C,h,w]
EpsModel = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Paper Eq. 4: (1 - w) eps_uncond + w eps_cond, with w = ``scale``."""
    return (1.0 - scale) * eps_uncond + scale * eps_cond


def _check_scale(scale) -> float:
    """w as a float: a finite real number (Python, numpy or a one-element tensor; not a bool). A NaN or
    infinite w would turn every sample into NaN."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.is_floating_point():
        scale = scale.item()
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale):
        return float(scale)
    raise ValueError(f"scale: expected a finite number w (Eq. 4: 0 unconditional, 1 conditional), got {scale!r}")


class GuidedEps(NamedTuple):
    """The two halves of a guided prediction and w, left unmixed for a fused update."""

    cond: torch.Tensor
    uncond: torch.Tensor
    scale: float

    def mix(self) -> torch.Tensor:
        """eps = (1 - w) eps_uncond + w eps_cond (Eq. 4; :func:`guided_eps`), shaped like ``cond``."""
        return guided_eps(self.cond, self.uncond, self.scale)


def resolve_eps(output: Union[torch.Tensor, GuidedEps]) -> torch.Tensor:
    """A denoiser's output as a single eps tensor (mixing guided halves)."""
    return output.mix() if isinstance(output, GuidedEps) else output


class ClassifierFreeGuidance:
    """Denoiser ``(x_t, t) -> GuidedEps | eps`` for a fixed condition and scale w.

    eps_model: the network as an eps predictor (see ``EpsModel``).
    cond: [B, cond_dim] vector condition k (one-hot / multi-hot) or None.
    cond_map: [B, cond_channels, H, W] spatial condition k_s or None.
    scale: w of Eq. 4. With no condition at all the model is called once
    unconditionally; with w = 1 (w = 0) only the conditional (unconditional)
    half is evaluated, since the other has weight zero.
    """

    def __init__(self, eps_model: EpsModel, cond: Optional[torch.Tensor] = None,
                 cond_map: Optional[torch.Tensor] = None, scale: float = 1.0):
        if cond is not None and cond_map is not None and cond.shape[0] != cond_map.shape[0]:
            raise ValueError(f"cond_map: batch size {cond_map.shape[0]} differs from cond's {cond.shape[0]}")
        self.eps_model = eps_model
        self.cond, self.cond_map, self.scale = cond, cond_map, _check_scale(scale)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> Union[torch.Tensor, GuidedEps]:
        """x: x_t [B, C, h, w]; t: [B] int64 timesteps. Returns eps [B, C, h, w] (no condition, w = 0 or
        w = 1: one network call of batch B) or a :class:`GuidedEps` of both halves and w (one call of
        batch 2B); mix it with :func:`resolve_eps`. ``cond`` / ``cond_map`` must have batch size B."""
        cond, cond_map = self.cond, self.cond_map
        if cond is None and cond_map is None:
            return self.eps_model(x, t, None, None)
        ref, name = (cond, "cond") if cond is not None else (cond_map, "cond_map")
        if ref.shape[0] != x.shape[0]:  # said here: the network sees the doubled batch of the guided pass
            raise ValueError(f"{name}: batch size {ref.shape[0]} differs from x_t's {x.shape[0]}")
        if self.scale == 1.0:
            return self.eps_model(x, t, cond, cond_map)
        null_cond, null_map = null_condition(cond, cond_map)
        if self.scale == 0.0:
            return self.eps_model(x, t, null_cond, null_map)
        both = self.eps_model(
            torch.cat([x, x]), torch.cat([t, t]),
            None if cond is None else torch.cat([cond, null_cond]),
            None if cond_map is None else torch.cat([cond_map, null_map]),
        )
        eps_cond, eps_uncond = both.chunk(2)
        return GuidedEps(eps_cond, eps_uncond, self.scale)
