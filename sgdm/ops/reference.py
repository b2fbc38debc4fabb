"""Plain-PyTorch references of every fused op.

These are the fallbacks when the compiled extension is missing or
``SGDM_KERNELS=0`` is set, and the oracles the kernel tests compare against.
The rest of the library calls :mod:`sgdm.ops`, never this module directly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def group_norm_silu_ref(x, num_groups, weight=None, bias=None, eps=1e-5, activation="silu"):
    """GroupNorm over (N, C, *) with fp32 statistics, then SiLU (or nothing)."""
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


def guided_ddim_step_ref(x_t, eps_cond, alpha_bar_t, alpha_bar_prev, eps_uncond=None,
                         guidance_scale=1.0, eta=0.0, noise=None, clip_x0=None):
    """Guided DDIM update (paper Eq. 4 guidance; Song et al. Eq. 12). Returns (x_prev, x0)."""
    def per_sample(a):
        if isinstance(a, torch.Tensor):
            return a.to(torch.float64 if x_t.dtype == torch.float64 else torch.float32).view(-1, *([1] * (x_t.dim() - 1)))
        return a

    a_t, a_prev = per_sample(alpha_bar_t), per_sample(alpha_bar_prev)
    dtype = x_t.dtype
    x, ec = x_t.float() if dtype != torch.float64 else x_t, eps_cond.to(x_t.float().dtype if dtype != torch.float64 else dtype)
    if eps_uncond is not None:
        eu = eps_uncond.to(ec.dtype)
        eps = (1.0 - guidance_scale) * eu + guidance_scale * ec
    else:
        eps = ec
    sqrt = torch.sqrt if isinstance(a_t, torch.Tensor) or isinstance(a_prev, torch.Tensor) else math.sqrt
    x0 = (x - sqrt(1.0 - a_t) * eps) / sqrt(a_t)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x - sqrt(a_t) * x0) / sqrt(1.0 - a_t) if not (isinstance(a_t, float) and a_t == 1.0) else eps
    sigma = eta * sqrt((1.0 - a_prev) / (1.0 - a_t)) * sqrt(1.0 - a_t / a_prev) if eta else 0.0
    dir_xt = sqrt(torch.clamp(torch.as_tensor(1.0 - a_prev - sigma**2), min=0.0) if isinstance(sigma, torch.Tensor) or isinstance(a_prev, torch.Tensor) else max(1.0 - a_prev - sigma**2, 0.0)) * eps
    x_prev = sqrt(a_prev) * x0 + dir_xt
    if eta and noise is not None:
        x_prev = x_prev + sigma * noise.to(x_prev.dtype)
    return x_prev.to(dtype), x0.to(dtype)


def attention_ref(q, k, v, scale=None):
    """softmax(q k^T * scale) v over [B, H, N, D], fp32 accumulation."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    return torch.matmul(s.softmax(-1), v.to(acc)).to(q.dtype)
