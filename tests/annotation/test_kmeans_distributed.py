"""Distributed k-means (torch.distributed, gloo on CPU): two ranks holding halves of the data
take the same steps as one process holding all of it."""
import os

import torch
import torch.multiprocessing as mp

from sgdm.annotation.kmeans import _lloyd, kmeans


def data():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 5, generator=g) * 4
    x = centres[torch.randint(6, (400,), generator=g)] + torch.randn(400, 5, generator=g)
    start = torch.cat([x[:5], torch.full((1, 5), 100.0)])  # the far centre starts empty: reseeded
    return x, start


def worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, start = data()
        mine = x[rank::world]
        centroids, labels, _, n_iter = _lloyd(mine, mine.pow(2).sum(1), start.clone(), 20, 0.0, 1 << 20, True)
        full = kmeans(mine, 6, generator=torch.Generator().manual_seed(1), distributed=True)
        torch.save({"centroids": centroids, "labels": labels, "n_iter": n_iter, "full": full}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    x, start = data()
    centroids, labels, _, n_iter = _lloyd(x, x.pow(2).sum(1), start.clone(), 20, 0.0, 1 << 20, False)
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["centroids"], centroids, rtol=0, atol=1e-5)
        assert torch.equal(got["labels"], labels[r::2]) and got["n_iter"] == n_iter
    # the full algorithm: same centroids on both ranks, inertia summed over ranks
    a, b = ranks[0]["full"], ranks[1]["full"]
    assert torch.equal(a.centroids, b.centroids) and a.inertia == b.inertia
    direct = sum(float((x[r::2].double() - a.centroids.double()[res.labels]).pow(2).sum()) for r, res in enumerate((a, b)))
    assert abs(a.inertia - direct) <= 1e-4 * direct
    single = kmeans(x, 6, generator=torch.Generator().manual_seed(1))
    assert a.inertia <= single.inertia * 1.01
