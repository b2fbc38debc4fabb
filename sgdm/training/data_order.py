"""Deterministic, resumable data order for training.

A run is a sequence of global micro-batches at positions p = 0, 1, 2, ...
(``accumulate`` positions make one optimiser step). Position p belongs to data
epoch e = p // batches_per_epoch; epoch e visits the dataset in the order of a
permutation drawn from (seed, "order", e), dropping the incomplete last batch.
Whether image i is horizontally flipped in epoch e comes from (seed, "flip", e).
A global micro-batch of G = world_size * micro_batch indices is split into
contiguous rank slices, so a run on W devices sees exactly the samples of a
single-device run with the same global batch. Nothing depends on how many
positions were consumed before: resuming at position p reproduces the order.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from sgdm.training.rng import generator_for

__all__ = ["DataOrder", "PositionSampler", "PositionedDataset", "Unreadable"]


class DataOrder:
    """Which dataset indices (and flips) make global micro-batch ``position``."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, flip: bool):
        if global_batch > num_samples:
            raise ValueError(f"global micro-batch {global_batch} is larger than the dataset ({num_samples} images); "
                             f"lower train.batch_size or use more data")
        self.num_samples, self.global_batch, self.seed, self.flip = num_samples, global_batch, seed, flip
        self.batches_per_epoch = num_samples // global_batch
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != epoch:
            perm = torch.randperm(self.num_samples, generator=generator_for(self.seed, "order", epoch))
            if self.flip:
                flips = torch.rand(self.num_samples, generator=generator_for(self.seed, "flip", epoch)) < 0.5
            else:
                flips = torch.zeros(self.num_samples, dtype=torch.bool)
            self._cache = (epoch, perm, flips)
        return self._cache[1], self._cache[2]

    def epoch_of(self, position: int) -> int:
        return position // self.batches_per_epoch

    def batch(self, position: int) -> list[tuple[int, bool]]:
        """[(index, flipped)] of the global micro-batch at ``position``, G entries."""
        perm, flips = self._epoch(self.epoch_of(position))
        start = (position % self.batches_per_epoch) * self.global_batch
        idx = perm[start:start + self.global_batch].tolist()
        return [(i, bool(flips[i])) for i in idx]


class PositionSampler(Sampler):
    """Batch sampler yielding this rank's slice of global micro-batches ``start() .. total - 1``.

    ``start`` is a callable read when iteration begins (the trainer's restored
    position), so a resumed or restarted loop continues where training stopped.
    ``len`` is the total number of positions, matching a loop that counts from 0.
    """

    def __init__(self, order: DataOrder, total: int, rank: int, world_size: int, start: Callable[[], int]):
        if order.global_batch % world_size:
            raise ValueError(f"global micro-batch {order.global_batch} does not divide by world size {world_size}")
        self.order, self.total, self.rank, self.world_size, self.start = order, total, rank, world_size, start
        self.micro = order.global_batch // world_size

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[list[tuple[int, int, int, bool]]]:
        """[(position, slot, index, flipped)]: slot is the sample's place in the global micro-batch."""
        lo = self.rank * self.micro
        for position in range(int(self.start()), self.total):
            items = self.order.batch(position)[lo:lo + self.micro]
            yield [(position, lo + j, index, flip) for j, (index, flip) in enumerate(items)]


class Unreadable(NamedTuple):
    """An unreadable sample's place (``data.on_bad_image: skip``): the collate drops it, and a micro-batch
    slice of only such samples still knows its position (its rank takes part in the step, adding nothing)."""

    position: int
    slot: int


class PositionedDataset(Dataset):
    """Wraps a dataset for keys ``(position, slot, index, flipped)``; adds ``position`` and ``slot`` (the
    sample's place in the global micro-batch, which picks its noise rows however many samples before it
    were dropped) and applies the flip.

    ``base`` maps an index to a sample dict; ``flip_fn(sample)`` returns the
    horizontally flipped sample (the image, or a cached latent pair). An
    unreadable sample (``None``, from ``data.on_bad_image: skip``) becomes :class:`Unreadable`.
    """

    def __init__(self, base: Dataset, flip_fn: Callable[[dict], dict]):
        self.base, self.flip_fn = base, flip_fn

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int, int, bool]) -> dict | Unreadable:
        position, slot, index, flipped = key
        sample = self.base[index]
        if sample is None:  # unreadable file under on_bad_image: skip; the collate drops it
            return Unreadable(position, slot)
        sample = self.flip_fn(sample) if flipped else dict(sample)
        sample["flipped"] = flipped
        sample["position"] = position
        sample["slot"] = slot
        return sample
