"""Building blocks shared by the UNet and the autoencoder.

Normalisation and attention go through :mod:`sgdm.ops` (fused kernels when built,
PyTorch references otherwise); nothing here calls ``F.group_norm`` or SDPA.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sgdm import ops

__all__ = ["GroupNorm", "timestep_embedding", "zero_module", "spatial_attention", "maybe_checkpoint"]


class GroupNorm(nn.Module):
    """GroupNorm with an optional fused SiLU: ``act(GN(x) * weight + bias)``.

    Parameters are named ``weight`` and ``bias`` like ``nn.GroupNorm``, so
    checkpoints written with ``nn.GroupNorm`` load unchanged.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, activation: str | None = None):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible by num_groups={num_groups}")
        self.num_groups, self.num_channels, self.eps, self.activation = num_groups, num_channels, eps, activation
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, activation={self.activation}"


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in ADM / Transformer.

    emb[:, i] = cos(t * f_i), emb[:, half + i] = sin(t * f_i), f_i = max_period^(-i / half),
    i = 0..half-1 (half = dim // 2); an odd ``dim`` gets one zero column.
    t: [B] -> [B, dim] float32.
    """
    if t.dim() != 1:
        raise ValueError(f"t: expected a 1-D tensor of timesteps [B], got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters: output convs start as identity residuals (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def spatial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over the pixels of [B, C, H, W] maps.

    Splits C into ``num_heads`` heads of C / num_heads channels, attends over the
    N = H*W positions with scale D^-1/2 via ``sgdm.ops.attention`` ([B, heads, N, D])
    and returns [B, C, H, W].
    """
    b, c, h, w = q.shape
    d = c // num_heads

    def heads(x):
        return x.reshape(b, num_heads, d, h * w).transpose(-1, -2)

    out = ops.attention(heads(q), heads(k), heads(v))
    return out.transpose(-1, -2).reshape(b, c, h, w)


def maybe_checkpoint(module: nn.Module, enabled: bool, *args):
    """Run ``module(*args)``, recomputing activations in backward when ``enabled`` and training."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)
