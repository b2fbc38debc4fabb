"""Random streams derived from (seed, stream, step, ...): no global RNG state anywhere.

Every draw of a training step (timesteps, noise, guidance dropout, latent
sampling) comes from a generator seeded by a hash of the run seed, a stream
name and the step's position. A resumed run, a run on more devices with the
same global batch, or a run that skipped a non-finite step therefore draws
exactly the same numbers for the same step.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch

__all__ = ["derive_seed", "generator_for", "seeded_global_rng", "seeded_cpu_rng"]


def derive_seed(seed: int, stream: str, *indices: int) -> int:
    """A 63-bit seed from ``seed``, a stream name and integer indices (stable across runs and platforms)."""
    text = ":".join([str(int(seed)), stream, *(str(int(i)) for i in indices)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator_for(seed: int, stream: str, *indices: int) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` (CPU so draws do not depend on the device)."""
    return torch.Generator().manual_seed(derive_seed(seed, stream, *indices))


@contextlib.contextmanager
def seeded_global_rng(device: torch.device, seed: int, stream: str, *indices: int):
    """Inside, the global RNG (what modules such as ``nn.Dropout`` draw from) is seeded by
    :func:`derive_seed` on the CPU and on ``device`` if it is a GPU; its earlier state is restored
    after. A resumed run then drops the same units at the same step; pass the rank among the
    indices so that data-parallel ranks draw differently."""
    devices = []
    if device.type == "cuda":
        devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, stream, *indices))
        yield


@contextlib.contextmanager
def seeded_cpu_rng(seed: int):
    """Inside, the CPU global RNG (what module initialisation in ``torch.nn`` and timm draws from) is
    seeded by ``seed``; its earlier state is restored after. No CUDA generator is touched:
    ``torch.manual_seed`` would reseed every CUDA device's, which ``fork_rng(devices=[])`` leaves so."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield
