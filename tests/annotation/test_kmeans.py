import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from sgdm.annotation.kmeans import assign, kmeans, kmeans_plusplus


def blobs(n=3000, centers=12, dim=8, seed=0):
    x, y = make_blobs(n, centers=centers, n_features=dim, cluster_std=1.5, random_state=seed)
    return torch.from_numpy(x.astype(np.float32)), y


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_inertia_matches_sklearn(init):
    x, _ = blobs()
    ref = KMeans(12, n_init=1, random_state=0).fit(x.numpy())
    ours = kmeans(x, 12, generator=torch.Generator().manual_seed(0), init=init, max_iter=300)
    if init == "random":  # random init may land in a worse local minimum; best of a few seeds
        ours = min((kmeans(x, 12, generator=torch.Generator().manual_seed(s), init=init, max_iter=300) for s in range(2)),
                   key=lambda r: r.inertia)
    assert ours.inertia <= ref.inertia_ * 1.01
    # inertia is what the labels and centroids say it is (float64 recomputation)
    direct = ((x.double() - ours.centroids.double()[ours.labels]) ** 2).sum()
    assert ours.inertia == pytest.approx(float(direct), rel=1e-5)


def test_minibatch_close_to_lloyd():
    x, _ = blobs()
    full = kmeans(x, 12, generator=torch.Generator().manual_seed(0))
    mini = kmeans(x, 12, generator=torch.Generator().manual_seed(0), batch_size=256, max_iter=30)
    assert mini.inertia <= full.inertia * 1.05


def test_deterministic_from_seed():
    x, _ = blobs()
    a = kmeans(x, 12, generator=torch.Generator().manual_seed(3))
    b = kmeans(x, 12, generator=torch.Generator().manual_seed(3))
    c = kmeans(x, 12, generator=torch.Generator().manual_seed(4), init="random", max_iter=1)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, c.centroids)


def test_chunked_assignment_equals_unchunked():
    x, _ = blobs(500)
    c = x[:37].clone()
    full = assign(x, c, chunk_elements=10**9)
    tiny = assign(x, c, chunk_elements=37 * 3)  # three rows per block
    assert torch.equal(full[0], tiny[0])
    ref = torch.cdist(x.double(), c.double()).pow(2).min(1)
    assert torch.equal(full[0], ref.indices)
    torch.testing.assert_close(full[1].double(), ref.values, rtol=1e-4, atol=1e-3)


def test_empty_cluster_is_reseeded():
    # a centre far from every point gets no points in the first assignment; it must move onto the
    # point farthest from its centroid (not stay put, not become NaN)
    from sgdm.annotation.kmeans import _lloyd

    x = torch.cat([torch.zeros(10, 2), torch.full((10, 2), 10.0), torch.tensor([[0.0, 10.0]]).repeat(10, 1)])
    x[20:, 0] += torch.linspace(0, 3, 10)
    start = torch.tensor([[0.0, 0.0], [10.0, 10.0], [1.5, 10.0], [1000.0, 1000.0]])
    centroids, labels, _, _ = _lloyd(x, x.pow(2).sum(1), start.clone(), 1, 0.0, 1 << 20, False)
    assert torch.isfinite(centroids).all()
    # after one step the empty centre sits on the farthest point of the spread group (x = 3 or x = 0)
    assert centroids[3].tolist() in ([3.0, 10.0], [0.0, 10.0])
    assert torch.equal(labels, assign(x, centroids)[0])
    assert (torch.bincount(labels, minlength=4) > 0).all()


@pytest.mark.parametrize("numpy_path", [True, False], ids=["cpu-numpy", "torch-as-on-gpu"])
@pytest.mark.parametrize("k", [30, 300])  # 300: the bound tightening step runs too (K >= 256)
def test_bounded_lloyd_takes_plain_lloyd_steps(monkeypatch, numpy_path, k):
    """Hamerly's bounds only skip work: every step equals a plain float64 Lloyd step."""
    from sgdm.annotation.kmeans import _lloyd, _Scorer

    monkeypatch.setattr(_Scorer, "use_numpy", numpy_path)
    x, _ = blobs(2000, centers=20, dim=16, seed=1)
    start = x[:k].clone()
    reference = start.double()
    for _ in range(8):
        labels = torch.cdist(x.double(), reference).argmin(1)
        reference = torch.stack([x.double()[labels == j].mean(0) if (labels == j).any() else reference[j]
                                 for j in range(k)])
    final_labels = torch.cdist(x.double(), reference).argmin(1)
    centroids, labels, dists, n_iter = _lloyd(x, x.pow(2).sum(1), start, 8, 0.0, 1 << 12, False)
    assert n_iter <= 8  # fewer: no label changed, so the remaining reference steps changed nothing
    torch.testing.assert_close(centroids.double(), reference, rtol=0, atol=1e-4)
    assert torch.equal(labels, final_labels)
    torch.testing.assert_close(dists.double(), (x.double() - reference[labels]).pow(2).sum(1), rtol=1e-4, atol=1e-4)


def test_kmeanspp_picks_distinct_far_points():
    x = torch.cat([torch.randn(100, 2, generator=torch.Generator().manual_seed(0)) * 0.01 + c for c in (0.0, 50.0, -50.0)])
    centres = kmeans_plusplus(x, 3, torch.Generator().manual_seed(0))
    rounded = sorted(round(float(v) / 50) for v in centres[:, 0])
    assert rounded == [-1, 0, 1]


@pytest.mark.parametrize("n,k,message", [(0, 1, "no rows"), (5, 6, "num_clusters=6"), (5, 0, "num_clusters=0")])
def test_bad_input(n, k, message):
    with pytest.raises(ValueError, match=message):
        kmeans(torch.zeros(n, 3), k, generator=torch.Generator())


def test_rejects_nan_and_wrong_rank():
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.tensor([[0.0], [float("nan")]]), 1, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        kmeans(torch.zeros(4), 1, generator=torch.Generator())


def test_half_gaps_in_blocks_match_cdist():
    from sgdm.annotation.kmeans import _half_gaps

    c = torch.randn(37, 5, generator=torch.Generator().manual_seed(0))
    ref = torch.cdist(c.double(), c.double()).fill_diagonal_(float("inf")).min(1).values / 2
    torch.testing.assert_close(_half_gaps(c, chunk_elements=37 * 4).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_tolerance_is_sklearn_mean_variance(offset):
    # an offset of 1e4 makes E||x||^2 - ||E x||^2 cancel in float64: the direct second pass takes over
    from sgdm.annotation.kmeans import _row_sq_norms, _tolerance

    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) * torch.arange(1.0, 7.0) + offset
    expected = 1e-4 * float(np.var(x.double().numpy(), axis=0).mean())
    assert _tolerance(x, _row_sq_norms(x), x.shape[0], 1e-4, False) == pytest.approx(expected, rel=1e-4)


def test_strict_convergence_stops_early_and_reports_phases():
    x, _ = blobs(600, centers=3, dim=4)
    result = kmeans(x, 3, generator=torch.Generator().manual_seed(0), tol=0.0, max_iter=100)
    assert result.n_iter < 100  # tol 0: only "no label changed" can stop it
    assert set(result.seconds) == {"setup", "init", "iterations"}
    lines = []
    kmeans(x, 3, generator=torch.Generator().manual_seed(0), tol=0.0, log=lines.append)
    assert len(lines) == result.n_iter and lines[-1].endswith("0 moved")


def test_overflowing_rows_are_named():
    with pytest.raises(ValueError, match="overflows"):
        kmeans(torch.tensor([[1e30, 0.0], [0.0, 1.0]]), 1, generator=torch.Generator())


def test_bench_device_report_runs_sgdm_alone_on_cpu():
    """The code path of ``kmeans_bench.py --device cuda`` (paper scale on one GPU), at toy scale on the CPU."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "kmeans_bench.py"
    spec = importlib.util.spec_from_file_location("kmeans_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.device_report(bench.parse_args(["--device", "cpu", "--n", "3000", "--dim", "16", "--k", "20"]))
    assert report["iterations"] >= 1 and report["empty_clusters"] == 0 and report["device"] == "cpu"
    assert set(report["phases_s"]) == {"setup", "init", "iterations"}
    assert 0 < report["inertia_per_point"] < 2  # unit rows: squared distances lie in [0, 4]
