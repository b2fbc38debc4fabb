"""Gaussian noise from explicit generators, one generator per sample if asked.

Passing a list of generators (one per batch element) makes every sample's noise
depend only on its own generator, so a batch of 8 and two batches of 4 draw the
same images. Noise is drawn in float32 on the generator's device and then moved,
so a CPU generator gives the same numbers whatever device the model runs on.
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
        return torch.randn(shape, generator=generator, device=generator.device).to(device=device, dtype=dtype)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"generator: got a list of {len(generators)} generators for a batch of {shape[0]}; "
                         "pass one generator per sample")
    for i, g in enumerate(generators):
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator[{i}]: expected a torch.Generator, got {type(g).__name__}")
    samples = [torch.randn(shape[1:], generator=g, device=g.device).to(device) for g in generators]
    return torch.stack(samples).to(dtype=dtype)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Noise shaped, typed and placed like ``x`` (see :func:`randn`)."""
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)
