"""Regression tests of the training-internals audit (checkpoint pruning, loss weighting, fp16 skips, cache)."""
from __future__ import annotations

import os

import torch

from sgdm.training.checkpoint import atomic_torch_save, checkpoint_name, find_last_valid, list_checkpoints, \
    prune_checkpoints


def test_pruning_after_a_resume_past_a_torn_newer_checkpoint_keeps_the_new_ones(tmp_path):
    """A resume starts from the newest *valid* checkpoint: a torn step-8 was skipped, training went on from
    step 2 and writes 4, 6. Pruning must not count the torn step-8 as the newest and delete 4 and 6."""
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / checkpoint_name(2))
    (tmp_path / checkpoint_name(8)).write_bytes((tmp_path / checkpoint_name(2)).read_bytes()[:-40])  # torn
    for i, step in enumerate((2, 8)):
        os.utime(tmp_path / checkpoint_name(step), ns=(10**18 + i, 10**18 + i))
    assert find_last_valid(tmp_path) == tmp_path / checkpoint_name(2)
    for i, step in enumerate((4, 6)):  # written by the resumed run, after the torn file
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / checkpoint_name(step))
        os.utime(tmp_path / checkpoint_name(step), ns=(2 * 10**18 + i, 2 * 10**18 + i))
        prune_checkpoints(tmp_path, keep=1)
        assert find_last_valid(tmp_path) == tmp_path / checkpoint_name(step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 8]
