"""Deterministic data order, rank slicing, resumable sampler; atomic checkpoint files."""
from __future__ import annotations

import pytest
import torch

from sgdm.training.checkpoint import (atomic_torch_save, checkpoint_name, clean_leftovers, find_last_valid,
                                      list_checkpoints, prune_checkpoints)
from sgdm.training.data_order import DataOrder, PositionSampler


def _positions(sampler):
    return [[key for key in batch] for batch in sampler]


def test_epochs_are_permutations_with_their_own_flips():
    order = DataOrder(10, 4, seed=1, flip=True)  # 2 batches per epoch, 2 images dropped
    e0 = order.batch(0) + order.batch(1)
    e1 = order.batch(2) + order.batch(3)
    assert len({i for i, _ in e0}) == 8 and len({i for i, _ in e1}) == 8
    assert [i for i, _ in e0] != [i for i, _ in e1]
    assert order.batch(3) == DataOrder(10, 4, seed=1, flip=True).batch(3)  # no hidden state
    assert order.batch(0) != DataOrder(10, 4, seed=2, flip=True).batch(0)
    assert not any(f for _, f in DataOrder(10, 4, seed=1, flip=False).batch(0))
    flips = [f for p in range(40) for _, f in order.batch(p)]
    assert 0.3 < sum(flips) / len(flips) < 0.7


def test_resumed_sampler_continues_and_ranks_partition_the_global_batch():
    order = DataOrder(12, 4, seed=0, flip=True)
    full = _positions(PositionSampler(order, 9, 0, 1, start=lambda: 0))
    assert len(full) == 9 and len(PositionSampler(order, 9, 0, 1, start=lambda: 5)) == 9
    assert _positions(PositionSampler(order, 9, 0, 1, start=lambda: 5)) == full[5:]
    r0 = _positions(PositionSampler(order, 9, 0, 2, start=lambda: 0))
    r1 = _positions(PositionSampler(order, 9, 1, 2, start=lambda: 0))
    assert [a + b for a, b in zip(r0, r1)] == full
    assert all([slot for _, slot, _, _ in batch] == [0, 1, 2, 3] for batch in full)  # places in the global batch
    with pytest.raises(ValueError, match="does not divide by world size 3"):
        PositionSampler(order, 9, 0, 3, start=lambda: 0)
    with pytest.raises(ValueError, match="larger than the dataset"):
        DataOrder(3, 4, seed=0, flip=False)


def test_atomic_save_never_leaves_a_partial_checkpoint(tmp_path):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"x": Boom()}, tmp_path / checkpoint_name(3))
    assert list(tmp_path.iterdir()) == []
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / checkpoint_name(2))
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / checkpoint_name(4))
    (tmp_path / checkpoint_name(6)).write_bytes((tmp_path / checkpoint_name(4)).read_bytes()[:-40])  # torn
    (tmp_path / f".{checkpoint_name(8)}.77.tmp").write_bytes(b"partial")
    assert find_last_valid(tmp_path) == tmp_path / checkpoint_name(4)
    assert [p.name for p in clean_leftovers(tmp_path)] == [f".{checkpoint_name(8)}.77.tmp"]
    prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
