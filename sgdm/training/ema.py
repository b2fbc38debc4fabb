"""Exponential moving average of the denoiser's weights (used for samples, evaluation, export).

theta_ema <- d_n theta_ema + (1 - d_n) theta at the n-th EMA update (n = 1, 2, ...),
with the warm-up d_n = min(decay, (1 + n) / (10 + n)) of LDM's ``LitEma`` (which
counts the update before using it: the first decays by 2/11) so early EMA weights
are not dominated by the random init.
Buffers (none in the UNet today) are copied, not averaged.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_decay", "update_ema"]


def ema_decay(num_updates: int, decay: float, warmup: bool = True) -> float:
    """The decay of the update that follows ``num_updates`` earlier ones (n = num_updates + 1)."""
    if not warmup:
        return decay
    n = num_updates + 1
    return min(decay, (1.0 + n) / (10.0 + n))


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
