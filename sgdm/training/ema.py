"""Exponential moving average of the denoiser's weights (used for samples, evaluation, export).

theta_ema <- d_n theta_ema + (1 - d_n) theta after the n-th optimiser step
(n = 0, 1, ...), with the warm-up d_n = min(decay, (1 + n) / (10 + n)) of
LDM's ``LitEma`` so early EMA weights are not dominated by the random init.
Buffers (none in the UNet today) are copied, not averaged.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_decay", "update_ema"]


def ema_decay(num_updates: int, decay: float, warmup: bool = True) -> float:
    """d_n for the n-th update (0-based)."""
    if not warmup:
        return decay
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """In place: ema = decay * ema + (1 - decay) * model, parameter by parameter (same structure)."""
    ema_params = dict(ema.named_parameters())
    model_params = dict(model.named_parameters())
    if ema_params.keys() != model_params.keys():
        missing = sorted(set(model_params) ^ set(ema_params))[:3]
        raise ValueError(f"ema: parameter names differ from the model's, e.g. {missing}")
    targets = [ema_params[name] for name in model_params]
    sources = [p.detach().to(e.dtype) for e, p in zip(targets, model_params.values())]
    # one fused lerp per (device, dtype) on the GPU instead of a kernel launch per parameter; the same
    # lerp as Tensor.lerp_ elementwise (the CPU runs it tensor by tensor)
    torch._foreach_lerp_(targets, sources, 1.0 - decay)
    for (name, b_ema), (_, b) in zip(ema.named_buffers(), model.named_buffers()):
        b_ema.copy_(b)
