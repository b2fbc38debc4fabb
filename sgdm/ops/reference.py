"""Plain-PyTorch references of every fused op.

These are the fallbacks when the compiled extension is missing or
``SGDM_KERNELS=0`` is set, and the oracles the kernel tests compare against
(fed float64 inputs, they compute in float64). The rest of the library calls
:mod:`sgdm.ops`, never this module directly. Arguments are validated by the
public wrappers in :mod:`sgdm.ops`, not here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; fp32/fp16/bf16 compute in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def group_norm_silu_ref(x, num_groups, weight=None, bias=None, eps=1e-5, activation="silu"):
    """``silu(GroupNorm(x))`` over x [N, C, *] with statistics in float32 (float64 for fp64).

    z = (x - mean_g) / sqrt(var_g + eps) * weight_c + bias_c, y = z * sigmoid(z);
    ``activation=None`` returns z. weight and bias are each [C] or [N, C] (per sample:
    weight_{n,c}, bias_{n,c}). Output dtype and memory format follow x.
    """
    acc = _compute_dtype(x)
    n, c = x.shape[:2]
    # Written out rather than F.group_norm, which refuses groups of a single element.
    groups = x.to(acc).reshape(n, num_groups, math.prod(x.shape[1:]) // num_groups)  # n may be 0
    mean = groups.mean(dim=-1, keepdim=True)
    var = (groups - mean).square().mean(dim=-1, keepdim=True)
    z = ((groups - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    spatial = (1,) * (x.dim() - 2)

    def affine(t):  # [C] or [N, C] -> broadcastable against x
        return t.to(acc).reshape((n if t.dim() == 2 else 1, c) + spatial)

    if weight is not None:
        z = z * affine(weight)
    if bias is not None:
        z = z + affine(bias)
    if activation == "silu":
        z = F.silu(z)
    if x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous():
        z = z.movedim(1, -1).contiguous().movedim(-1, 1)  # keep channels-last, like the kernel
    return z.to(x.dtype)


def _coefficient_dtype(like: torch.Tensor) -> torch.dtype:
    """float64 for the per-sample coefficients, as the kernels compute them (float32 where the device
    has no float64: MPS)."""
    return torch.float32 if like.device.type == "mps" else torch.float64


def _per_sample(alpha, like: torch.Tensor, dtype: torch.dtype):
    """A float becomes a 0-d tensor; a [B] tensor becomes [B, 1, ..., 1]; both in ``dtype``."""
    if isinstance(alpha, torch.Tensor):
        return alpha.to(device=like.device, dtype=dtype).view(-1, *([1] * (like.dim() - 1)))
    return torch.tensor(float(alpha), dtype=dtype, device=like.device)


def guided_ddim_step_ref(x_t, eps_cond, alpha_bar_t, alpha_bar_prev, eps_uncond=None,
                         guidance_scale=1.0, eta=0.0, noise=None, clip_x0=None):
    """One guided DDIM update; returns ``(x_prev, x0_pred)`` in x_t's dtype.

    eps     = (1 - w) * eps_uncond + w * eps_cond            (paper Eq. 4; eps_cond if no uncond)
    x0      = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)         (clamped to [-c, c] with clip_x0=c,
                                                                then eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t))
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)   (0 when a_t = 1)
    x_prev  = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma_t^2) * eps + sigma_t * noise
    (Song et al. 2021, Eq. 12). Computed in float32, or float64 for fp64 inputs; the per-sample
    coefficients in float64, as in the kernels: near a_t = 1 (the last steps), 1 - a_t formed in
    float32 keeps only the digits of a_t's rounding (2e-4 relative error with clipping at t = 1).
    """
    acc = _compute_dtype(x_t)
    coef = _coefficient_dtype(x_t)
    x = x_t.to(acc)
    a_t, a_prev = _per_sample(alpha_bar_t, x, coef), _per_sample(alpha_bar_prev, x, coef)
    eps = eps_cond.to(acc)
    if eps_uncond is not None:
        eps = (1.0 - guidance_scale) * eps_uncond.to(acc) + guidance_scale * eps
    one_m_at = 1.0 - a_t
    noisy = one_m_at > 0  # a_t == 1: nothing left to denoise
    tiny = torch.finfo(coef).tiny
    x0 = (x - one_m_at.sqrt().to(acc) * eps) / a_t.sqrt().to(acc)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = torch.where(noisy, (x - a_t.sqrt().to(acc) * x0) / one_m_at.clamp_min(tiny).sqrt().to(acc), eps)
    ratio = (1.0 - a_t / a_prev).clamp_min(0.0)
    sigma = torch.where(noisy, eta * ((1.0 - a_prev) / one_m_at.clamp_min(tiny)).sqrt() * ratio.sqrt(),
                        torch.zeros_like(a_t))
    direction = (1.0 - a_prev - sigma ** 2).clamp_min(0.0).sqrt()
    x_prev = a_prev.sqrt().to(acc) * x0 + direction.to(acc) * eps
    if noise is not None:
        x_prev = x_prev + sigma.to(acc) * noise.to(acc)
    return x_prev.to(x_t.dtype), x0.to(x_t.dtype)


# attention_ref lives beside its kernel wrapper (sgdm/ops/attention.py); kept importable here.
from sgdm.ops.attention import attention_ref  # noqa: E402,F401
