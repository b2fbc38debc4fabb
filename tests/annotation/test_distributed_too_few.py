"""Distributed k-means whose rank 0 holds fewer points than K: every rank stops with the same error
(rank 0 alone used to raise while the others waited for its centres)."""
import datetime
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.launchers import leave_process


def _in_group(rank, world, init_file, body, *args):
    """Runs ``body(rank, *args)`` in a gloo group of ``world`` processes. A short timeout: the old code
    left a rank waiting in a collective the others never joined."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        body(rank, *args)
    finally:
        dist.destroy_process_group()
    leave_process()


def _spawn(tmp_path, body, *args):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_in_group, args=(2, str(tmp_path / "init"), body, *args), nprocs=2, join=True)


def worker(rank, out_dir):
    from sgdm.annotation.kmeans import kmeans

    x = torch.randn(3 if rank == 0 else 10, 4, generator=torch.Generator().manual_seed(rank))
    try:
        kmeans(x, 5, generator=torch.Generator().manual_seed(0), distributed=True)
        outcome = "ran"
    except ValueError as err:
        outcome = f"ValueError: {err}"
    except RuntimeError as err:  # e.g. the collective's timeout
        outcome = f"RuntimeError: {err}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as handle:
        handle.write(outcome)


@pytest.mark.slow
def test_every_rank_raises_when_rank_0_has_fewer_points_than_k(tmp_path):
    _spawn(tmp_path, worker, str(tmp_path))
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    for outcome in outcomes:
        assert outcome.startswith("ValueError: kmeans: rank 0 holds 3 points, fewer than num_clusters=5"), outcomes


def minibatch_worker(rank, out_dir):
    from sgdm.annotation.kmeans import kmeans

    x = torch.randn(40 if rank == 0 else 27, 4, generator=torch.Generator().manual_seed(rank))
    try:
        result = kmeans(x, 3, generator=torch.Generator().manual_seed(0), batch_size=8, max_iter=3,
                        distributed=True)
        torch.save(result.centroids, os.path.join(out_dir, f"rank{rank}.pt"))
    except RuntimeError as err:  # the old code's collectives fell out of step and timed out
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as handle:
            handle.write(str(err))


@pytest.mark.slow
def test_minibatch_with_unequal_ranks_keeps_the_collectives_in_step(tmp_path):
    # rank 0 has 5 mini-batches per pass, rank 1 four: every rank must take the same number of steps
    _spawn(tmp_path, minibatch_worker, str(tmp_path))
    assert not list(tmp_path.glob("rank*.txt")), [p.read_text()[:200] for p in tmp_path.glob("rank*.txt")]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(a, b)


class _LaterUnreadable(torch.utils.data.Dataset):
    """Images from index ``first_bad`` on cannot be read (the data layer returns None)."""

    def __init__(self, inner, first_bad):
        self.inner, self.ids, self.first_bad = inner, inner.ids, first_bad

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return None if i >= self.first_bad else self.inner[i]


def empty_rank_worker(rank, out_dir, weights, cache):
    import pathlib

    from sgdm.annotation.annotate import annotate
    from sgdm.data import build_dataset

    from .test_annotate import config

    cfg = config(pathlib.Path(out_dir), weights, pathlib.Path(cache), num_images=20, shard_size=8, num_classes=3)
    dataset = _LaterUnreadable(build_dataset(cfg.data, train=False), 8)  # rank 1's shards 1 (8-15): unreadable
    # (shard 2, rank 0's, too): rank 1 holds no CLS feature at all
    result = annotate(cfg, "label", dataset=dataset, progress=False, log=lambda m: None)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as handle:
        handle.write(str(result.num_images))


@pytest.mark.slow
def test_a_rank_whose_images_are_all_unreadable_still_clusters(tmp_path, tiny_weights, shapes_cache):
    _spawn(tmp_path, empty_rank_worker, str(tmp_path), str(tiny_weights), str(shapes_cache))
    from sgdm.annotation.store import AnnotationStore

    assert (tmp_path / "rank0.txt").read_text() == "8"
    assert len(AnnotationStore.open(tmp_path / "store")) == 8
