"""Two ranks (gloo on CPU, spawned once for every check): a rank that fails inside the distributed k-means of
the CLS features (reading its shards, its features, rank 0's k-means++, a Lloyd iteration, a mini-batch step,
the final distances) stops the other one at once with RankFailed naming the failed rank and its error, while
the failed rank raises its own; before, the other rank waited in its next collective until the group's
timeout. After each failure both ranks are still in step: the next k-means runs normally."""
import datetime
import os
import time
import types

import pytest
import torch
import torch.multiprocessing as mp

from sgdm.annotation.config import KMeansConfig
from tests.launchers import leave_process

from .test_stego_rank_failure import _outcome

TIMEOUT = 60  # seconds: the old code left a rank waiting this long in a collective, then failed (a loaded
# machine must not reach it while the new code runs: the two ranks share its cores)
DEADLINE = 240  # seconds for the whole spawn: the old code's checks fell out of step, and may wait for each other


def _points(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 + rank)
    centres = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) * 5
    return centres[torch.randint(4, (30,), generator=g)] + torch.randn(30, 3, generator=g)


class _Cache:
    """The feature cache of ``_cluster``: two shards of CLS features, shard s on rank s % 2."""

    def __init__(self, unreadable_on=None):
        self.unreadable_on = unreadable_on

    def load(self, shard, keys=None):
        import torch.distributed as dist

        if dist.get_rank() == self.unreadable_on:
            raise OSError(f"shard {shard} is truncated")
        return {"cls": _points(shard), "index": torch.arange(30) + 30 * shard}


def worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from sgdm.annotation import annotate as annotate_module
    from sgdm.annotation import kmeans as kmeans_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    x = _points(rank)

    def run(points=x, **kwargs):
        return kmeans_module.kmeans(points, 4, generator=torch.Generator().manual_seed(0), distributed=True, **kwargs)

    outcomes = {}

    def failing_on(name, failing_rank, call, error):
        real, calls = getattr(kmeans_module, name), []

        def fails(*args, **kwargs):
            calls.append(1)
            if rank == failing_rank and len(calls) == call:
                raise error
            return real(*args, **kwargs)

        setattr(kmeans_module, name, fails)
        return lambda: setattr(kmeans_module, name, real)

    restore = failing_on("_reassign", 1, 1, RuntimeError("out of memory"))  # in the first Lloyd iteration
    outcomes["iteration"] = _outcome(lambda: run(tol=0.0))
    restore()

    restore = failing_on("kmeans_plusplus", 0, 1, MemoryError("k-means++ sample"))
    outcomes["k-means++"] = _outcome(run)
    restore()

    nan = x.clone()
    nan[3, 1] = float("nan")
    outcomes["features"] = _outcome(lambda: run(nan if rank == 1 else x))

    restore = failing_on("assign", 1, 2, RuntimeError("out of memory"))  # the second mini-batch step
    outcomes["mini-batch"] = _outcome(lambda: run(batch_size=8, max_iter=3))
    restore()

    restore = failing_on("_own_sq_distance", 1, 1, RuntimeError("CUDA error: an illegal memory access"))
    outcomes["distances"] = _outcome(run)
    restore()

    a = types.SimpleNamespace(seed=0, kmeans=KMeansConfig())
    outcomes["reading"] = _outcome(lambda: annotate_module._cluster(_Cache(unreadable_on=1), 2, a, 4,
                                                                     torch.device("cpu")))

    result = run()  # still in step
    labels, _, f = annotate_module._cluster(_Cache(), 2, a, 4, torch.device("cpu"))
    torch.save({"outcomes": outcomes, "centroids": result.centroids, "labels": labels, "f": f.centroids},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    leave_process()


@pytest.mark.slow
def test_a_rank_failing_in_distributed_kmeans_stops_the_other_at_once(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    context = mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    start = time.monotonic()
    while not context.join(timeout=1):
        if time.monotonic() - start > DEADLINE:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {DEADLINE} s: one waited for the other")
    (a, b) = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    failed = {"iteration": 1, "k-means++": 0, "features": 1, "mini-batch": 1, "distances": 1, "reading": 1}
    errors = {"iteration": "RuntimeError: out of memory", "k-means++": "MemoryError: k-means++ sample",
              "features": "ValueError: kmeans: x contains NaN or inf values",
              "mini-batch": "RuntimeError: out of memory",
              "distances": "RuntimeError: CUDA error: an illegal memory access",
              "reading": "OSError: shard 1 is truncated"}
    what = dict.fromkeys(failed, "clustering with k-means") | {"reading": "reading the CLS features"}
    for check, rank in failed.items():
        own, other = (a, b)[rank]["outcomes"][check], (b, a)[rank]["outcomes"][check]
        assert own == errors[check], (check, own)
        assert other == (f"RankFailed: annotate: another rank failed {what[check]}: rank {rank} of 2 raised "
                         f"{errors[check]}; this one stops too"), (check, other)
    assert torch.equal(a["centroids"], b["centroids"]) and torch.equal(a["f"], b["f"])
    assert b["labels"] is None and a["labels"].shape == (60,)
