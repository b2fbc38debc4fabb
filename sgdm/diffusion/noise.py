"""Gaussian noise from explicit generators, one generator per sample if asked.

Passing a list of generators (one per batch element) makes every sample's noise
depend only on its own generator, so a batch of 8 and two batches of 4 draw the
same images. Noise is drawn in float32 on the generator's device and then moved,
so a CPU generator gives the same numbers whatever device the model runs on. CPU noise
for a GPU goes over in one copy from pinned memory that does not block the host (a
sampler draws noise every step; a pageable copy per sample would wait for the GPU each time).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator], None]

__all__ = ["Generators", "randn", "randn_like"]


def randn(shape: Sequence[int], generator: Generators = None, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` [B, ...].

    generator: None (torch's default generator), one ``torch.Generator`` for the
    whole batch, or a sequence of B generators, sample b drawn from generator[b].
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return _move(torch.randn(shape, generator=generator, device=generator.device), device).to(dtype=dtype)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"generator: got a list of {len(generators)} generators for a batch of {shape[0]}; "
                         "pass one generator per sample")
    for i, g in enumerate(generators):
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator[{i}]: expected a torch.Generator, got {type(g).__name__}")
    if all(g.device.type == "cpu" for g in generators):  # stacked where drawn, then one copy
        return _move(torch.stack([torch.randn(shape[1:], generator=g) for g in generators]), device).to(dtype=dtype)
    samples = [torch.randn(shape[1:], generator=g, device=g.device).to(device) for g in generators]
    return torch.stack(samples).to(dtype=dtype)


def _move(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``; CPU -> CUDA through pinned memory without blocking the host (the caching
    host allocator keeps the pinned block until the copy is done)."""
    device = torch.device(device)
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Noise shaped, typed and placed like ``x`` (see :func:`randn`)."""
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)
