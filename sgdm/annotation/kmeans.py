"""k-means in torch (the paper's self-labelling function f for clusters, Sec. 3.2).

Lloyd iterations minimise the inertia ``sum_i min_k ||x_i - c_k||^2`` over
points ``x [N, D]`` and centroids ``c [K, D]``. Distances are computed as
``||x||^2 - 2 x c^T + ||c||^2`` in row blocks of at most ``chunk_elements``
entries, so N = 1.3M, D = 768, K = 10,000 (the paper's ImageNet setting)
needs about 4 GB for ``x`` plus 128 MB per block on one GPU.

* k-means++ initialisation (greedy, ``2 + log K`` trials per centre, as
  Arthur & Vassilvitskii 2007 / scikit-learn), optionally on a random subset
  (``init_sample``), since exact k-means++ costs O(N K D).
* Empty clusters are re-seeded with the points farthest from their centroid.
* Mini-batch mode (Sculley 2010): per-centre learning rate 1 / count.
* Distributed mode: each rank holds its own points; centroid sums, counts and
  inertia are all-reduced, and rank 0's k-means++ centres are broadcast.
* Deterministic: all randomness comes from the ``generator`` argument.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

__all__ = ["KMeansResult", "kmeans", "assign", "kmeans_plusplus"]


@dataclasses.dataclass
class KMeansResult:
    """``centroids [K, D]`` float32, ``labels [N]`` int64, ``inertia`` (sum of squared distances)."""

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_reduce(tensor: torch.Tensor, distributed: bool) -> torch.Tensor:
    dist = _dist() if distributed else None
    if dist is not None:
        dist.all_reduce(tensor)
    return tensor


def _rows_per_block(num_clusters: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, num_clusters))


def assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    chunk_elements: int = 1 << 25,
    x_sq: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of ``x [N, D]``: ``(labels [N] int64, squared distance [N])``."""
    if x_sq is None:
        x_sq = x.pow(2).sum(1)
    c_sq = centroids.pow(2).sum(1).unsqueeze(0)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    rows = _rows_per_block(centroids.shape[0], chunk_elements)
    ct = centroids.t()
    for start in range(0, x.shape[0], rows):
        end = min(start + rows, x.shape[0])
        block = torch.addmm(c_sq, x[start:end], ct, beta=1.0, alpha=-2.0)  # ||c||^2 - 2 x.c
        d, idx = block.min(1)
        labels[start:end] = idx
        dists[start:end] = (d + x_sq[start:end]).clamp_min_(0)
    return labels, dists


def _sq_dist_to(points: torch.Tensor, x: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """Squared distances ``[P, N]`` from ``points [P, D]`` to every row of ``x``."""
    p_sq = points.pow(2).sum(1, keepdim=True)
    return torch.addmm(x_sq.unsqueeze(0) + p_sq, points, x.t(), beta=1.0, alpha=-2.0).clamp_min_(0)


def kmeans_plusplus(x: torch.Tensor, num_clusters: int, generator: torch.Generator, x_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy k-means++ centres ``[K, D]``: each new centre is the best of ``2 + log K``
    candidates drawn with probability proportional to the squared distance to the
    nearest centre chosen so far (the candidate that lowers the potential most wins)."""
    n = x.shape[0]
    if x_sq is None:
        x_sq = x.pow(2).sum(1)
    trials = 2 + int(math.log(num_clusters))
    centres = torch.empty(num_clusters, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    centres[0] = x[first]
    closest = _sq_dist_to(x[first : first + 1], x, x_sq)[0]
    potential = closest.double().sum()
    for c in range(1, num_clusters):
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * potential
        cumulative = closest.double().cumsum(0)
        candidates = torch.searchsorted(cumulative, draws).clamp_(max=n - 1)
        candidate_closest = torch.minimum(closest.unsqueeze(0), _sq_dist_to(x[candidates], x, x_sq))
        potentials = candidate_closest.double().sum(1)
        best = int(potentials.argmin())
        closest = candidate_closest[best]
        potential = potentials[best]
        centres[c] = x[candidates[best]]
    return centres


def _check_inputs(x: torch.Tensor, num_clusters: int, distributed: bool) -> int:
    if x.dim() != 2:
        raise ValueError(f"kmeans: x must be [N, D], got shape {tuple(x.shape)}")
    n_total = torch.tensor([x.shape[0]], device=x.device)
    n_total = int(_all_reduce(n_total, distributed))
    if n_total == 0:
        raise ValueError("kmeans: x has no rows (empty dataset?)")
    if num_clusters < 1 or num_clusters > n_total:
        raise ValueError(f"kmeans: num_clusters={num_clusters} must be between 1 and the number of points N={n_total}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("kmeans: x contains NaN or inf values")
    return n_total


def _initial_centroids(x, x_sq, num_clusters, generator, init, init_sample, distributed) -> torch.Tensor:
    dist = _dist() if distributed else None
    rank = dist.get_rank() if dist is not None else 0
    centres = torch.empty(num_clusters, x.shape[1], dtype=x.dtype, device=x.device)
    if rank == 0:
        if num_clusters > x.shape[0]:
            raise ValueError(f"kmeans: rank 0 holds {x.shape[0]} points, fewer than num_clusters={num_clusters}")
        sample, sample_sq = x, x_sq
        if 0 < init_sample < x.shape[0]:
            idx = torch.randperm(x.shape[0], generator=generator)[: max(init_sample, num_clusters)].to(x.device)
            sample, sample_sq = x[idx], x_sq[idx]
        if init == "random":
            idx = torch.randperm(sample.shape[0], generator=generator)[:num_clusters].to(x.device)
            centres = sample[idx].clone()
        elif init == "k-means++":
            centres = kmeans_plusplus(sample, num_clusters, generator, sample_sq)
        else:
            raise ValueError(f"kmeans: init must be 'k-means++' or 'random', got {init!r}")
    if dist is not None:
        dist.broadcast(centres, 0)
    return centres


def _reseed_empty(centroids, counts, x, dists, distributed) -> int:
    """Move empty centroids onto the points farthest from their centroid (global top-n)."""
    empty = (counts == 0).nonzero().flatten()
    n_empty = int(empty.numel())
    if n_empty == 0:
        return 0
    m = min(n_empty, x.shape[0])
    far_d, far_i = dists.topk(m)
    far_x = x[far_i]
    dist = _dist() if distributed else None
    if dist is not None:
        world = dist.get_world_size()
        pad_d = torch.full((n_empty,), -1.0, dtype=dists.dtype, device=x.device)
        pad_x = torch.zeros(n_empty, x.shape[1], dtype=x.dtype, device=x.device)
        pad_d[:m], pad_x[:m] = far_d, far_x
        all_d = [torch.empty_like(pad_d) for _ in range(world)]
        all_x = [torch.empty_like(pad_x) for _ in range(world)]
        dist.all_gather(all_d, pad_d)
        dist.all_gather(all_x, pad_x)
        far_d, order = torch.cat(all_d).topk(n_empty)
        far_x = torch.cat(all_x)[order]
    centroids[empty[: far_x.shape[0]]] = far_x[:n_empty]
    return n_empty


def _lloyd(x, x_sq, centroids, max_iter, tol_abs, chunk_elements, distributed):
    k = centroids.shape[0]
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        labels, dists = assign(x, centroids, chunk_elements, x_sq)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        _all_reduce(sums, distributed)
        _all_reduce(counts, distributed)
        new = sums / counts.clamp_min(1).unsqueeze(1)
        _reseed_empty(new, counts, x, dists, distributed)
        shift = float((new - centroids).pow(2).sum())
        centroids = new
        if shift <= tol_abs:
            break
    return centroids, n_iter


def _minibatch(x, x_sq, centroids, max_iter, tol_abs, batch_size, generator, chunk_elements, distributed):
    """Sculley's mini-batch k-means; ``max_iter`` counts passes over the data."""
    k = centroids.shape[0]
    totals = torch.zeros(k, dtype=x.dtype, device=x.device)
    steps = max(1, math.ceil(x.shape[0] / batch_size))
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        start_centroids = centroids.clone()
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size]
            xb = x[idx]
            labels, _ = assign(xb, centroids, chunk_elements, x_sq[idx])
            sums = torch.zeros_like(centroids).index_add_(0, labels, xb)
            counts = torch.bincount(labels, minlength=k).to(x.dtype)
            _all_reduce(sums, distributed)
            _all_reduce(counts, distributed)
            totals += counts
            hit = counts > 0
            # c <- c + (sum_b - n_b c) / n_total: the running mean of every point seen so far
            centroids[hit] += (sums[hit] - counts[hit, None] * centroids[hit]) / totals[hit, None]
        _, dists = assign(x, centroids, chunk_elements, x_sq)
        if _reseed_empty(centroids, totals, x, dists, distributed):
            totals.clamp_min_(1)
        if float((centroids - start_centroids).pow(2).sum()) <= tol_abs:
            break
    return centroids, n_iter


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    generator: torch.Generator,
    max_iter: int = 100,
    tol: float = 1e-4,
    init: str = "k-means++",
    init_sample: int = 0,
    batch_size: int = 0,
    chunk_elements: int = 1 << 25,
    distributed: bool = False,
) -> KMeansResult:
    """Cluster ``x [N, D]`` into ``num_clusters`` groups; runs on ``x``'s device.

    ``tol`` is relative to the mean per-dimension variance of ``x`` (scikit-learn's
    convention): iterations stop once the summed squared centroid shift falls
    below ``tol * mean(var(x, 0))``. ``batch_size > 0`` selects mini-batch mode.
    ``distributed=True`` (inside ``torch.distributed``) treats the ranks' ``x``
    as one dataset; every rank gets the same centroids and its own labels.
    ``generator`` is a CPU generator; seed it identically on every rank.
    """
    n_total = _check_inputs(x, num_clusters, distributed)
    x = x.float().contiguous()
    x_sq = x.pow(2).sum(1)
    moments = torch.stack([x.sum(0), x.pow(2).sum(0)]).double()
    _all_reduce(moments, distributed)
    mean = moments[0] / n_total
    variance = (moments[1] / n_total - mean.pow(2)).clamp_min(0)
    tol_abs = tol * float(variance.mean())
    centroids = _initial_centroids(x, x_sq, num_clusters, generator, init, init_sample, distributed)
    if batch_size > 0:
        centroids, n_iter = _minibatch(x, x_sq, centroids, max_iter, tol_abs, batch_size, generator, chunk_elements, distributed)
    else:
        centroids, n_iter = _lloyd(x, x_sq, centroids, max_iter, tol_abs, chunk_elements, distributed)
    labels, dists = assign(x, centroids, chunk_elements, x_sq)
    inertia = _all_reduce(dists.double().sum().reshape(1), distributed)
    return KMeansResult(centroids=centroids, labels=labels, inertia=float(inertia), n_iter=n_iter)


def kmeans_from_config(x: torch.Tensor, num_clusters: int, cfg, generator: torch.Generator, distributed: bool = False) -> KMeansResult:
    """:func:`kmeans` with the parameters of a :class:`~sgdm.annotation.config.KMeansConfig`."""
    return kmeans(
        x,
        num_clusters,
        generator=generator,
        max_iter=cfg.max_iter,
        tol=cfg.tol,
        init=cfg.init,
        init_sample=cfg.init_sample,
        batch_size=cfg.batch_size,
        chunk_elements=cfg.chunk_elements,
        distributed=distributed,
    )
