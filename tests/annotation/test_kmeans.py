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


def test_bounded_lloyd_takes_plain_lloyd_steps():
    """Hamerly's bounds only skip work: every step equals a plain float64 Lloyd step."""
    from sgdm.annotation.kmeans import _lloyd

    x, _ = blobs(2000, centers=20, dim=16, seed=1)
    start = x[:30].clone()
    reference = start.double()
    for _ in range(8):
        labels = torch.cdist(x.double(), reference).argmin(1)
        reference = torch.stack([x.double()[labels == j].mean(0) for j in range(30)])
    final_labels = torch.cdist(x.double(), reference).argmin(1)
    centroids, labels, dists, n_iter = _lloyd(x, x.pow(2).sum(1), start, 8, 0.0, 1 << 12, False)
    assert n_iter == 8
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
