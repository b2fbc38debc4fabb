"""k-means in torch (the paper's self-labelling function f for clusters, Sec. 3.2).

Lloyd iterations minimise the inertia ``sum_i min_k ||x_i - c_k||^2`` over
points ``x [N, D]`` and centroids ``c [K, D]``. Distances are computed as
``||x||^2 - 2 x c^T + ||c||^2``: one GEMM per block of rows, then a row-wise
min. No ``N x K`` matrix is ever formed: a block holds at most
``chunk_elements`` scores (on the CPU also at most ~1M, so that it stays in
cache), so N = 1.3M, D = 768, K = 10,000 (the paper's ImageNet setting) needs
4 GB for ``x`` plus 128 MB per block on one GPU.

* Initialisation: greedy k-means++ (``2 + log K`` trials per centre, Arthur &
  Vassilvitskii 2007 / scikit-learn) on a random subset of ``init_sample``
  points. It takes K sequential steps, each one pass over the subset (not over
  all N points): O(init_sample x K x D x trials). With 16 points per cluster
  (``annotation.kmeans.init_points_per_cluster``) that is 10,000 steps over
  160k points at the paper's scale, seconds on one GPU, with no host sync per
  step. k-means|| (Bahmani et al. 2012) would take fewer passes, but needs a
  weighted k-means++ on its candidates afterwards; the subset costs less here
  and Lloyd repairs the rest (inertia within ~0.7% of scikit-learn's with
  k-means++ on all points, measured at K = 100 and 1000).
* Lloyd steps with Hamerly's (2010) distance bounds, per group of centroids
  from K = 256 on (Yinyang's global filter, Ding et al. 2015): identical
  steps, but points whose nearest centroid provably did not change skip the
  O(K D) distance computation, and centroid sums are updated by the points
  that changed cluster only (float64, no drift).
* Stopping: scikit-learn's rule, summed squared centroid shift below
  ``tol * mean(var(x, 0))``.
* Empty clusters are re-seeded with the points farthest from their centroid.
* Mini-batch mode (Sculley 2010): per-centre learning rate 1 / count.
* Distributed mode: each rank holds its own points; centroid sums, counts and
  inertia are all-reduced, and rank 0's k-means++ centres are broadcast. A rank
  whose own work fails (out of memory in its share of an assignment) stops every
  rank at the next collective with :class:`~sgdm.annotation.ranks.RankFailed`
  (:class:`~sgdm.annotation.ranks.Failures`): its flag travels in the counts'
  all-reduce of each Lloyd iteration or mini-batch step, in the all-reduce of the
  moved points, the gather of the re-seeding candidates and the broadcast of the
  centres; one extra all-reduce per run settles the final distances.
* Deterministic: all randomness comes from the ``generator`` argument.
* GPU: host syncs happen a few times per Lloyd iteration (which points to
  recompute, convergence), never per block nor per k-means++ step.
* Speed on the CPU (``benchmarks/kmeans_bench.py``, one thread): numpy's
  OpenBLAS GEMM and argmin on cache-sized blocks; faster than scikit-learn
  and faiss-cpu at the benchmark's sizes (``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import numpy as np
import torch

from sgdm.annotation.ranks import Failures

__all__ = ["KMeansResult", "kmeans", "assign", "kmeans_plusplus"]

# CPU score blocks of ~1M floats stay in L2/L3: measured 1.3x faster than one big block (K = 100..1000)
_CPU_BLOCK_ELEMENTS = 1 << 20


@dataclasses.dataclass
class KMeansResult:
    """``centroids [K, D]`` float32, ``labels [N]`` int64, ``inertia`` (sum of squared distances),
    ``n_iter`` Lloyd iterations (mini-batch: passes), ``seconds`` wall time per phase."""

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int
    seconds: dict = dataclasses.field(default_factory=dict)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_reduce(tensor: torch.Tensor, distributed: bool) -> torch.Tensor:
    dist = _dist() if distributed else None
    if dist is not None:
        dist.all_reduce(tensor)
    return tensor


# what the ranks do together, for the message of a rank that stops because another failed
_STAGE = "clustering with k-means"


def _failures(failures: Optional[Failures], device: torch.device, distributed: bool) -> Failures:
    return failures if failures is not None else Failures(_STAGE, device, distributed)


def _meet(counts: torch.Tensor, failures: Failures) -> torch.Tensor:
    """``counts`` (integer-valued) summed over the ranks, each rank's failure flag in the same all-reduce:
    where one rank's work failed (it sends counts of the right shape, any values), every rank stops here
    (:meth:`~sgdm.annotation.ranks.Failures.raise_if`). The sum runs in float64, exact up to 2**53 in any
    order of the ranks, so the flag changes no result; a copy outside a process group."""
    if not failures.active:
        return counts.clone()
    import torch.distributed as dist

    flat = torch.cat([counts.reshape(-1).double(), failures.flag().double()])
    dist.all_reduce(flat, group=failures.group)
    failures.raise_if(flat[-1:])
    return flat[:-1].view(counts.shape).to(counts.dtype)


def _block_rows(width: int, chunk_elements: int, device: torch.device, cpu_elements: int = _CPU_BLOCK_ELEMENTS) -> int:
    """Rows per block of ``width`` columns: at most ``chunk_elements`` entries, on the CPU at most
    ``cpu_elements`` (cache-resident: a 20000 x 768 gather-subtract-square took 62 ms in one block,
    5 ms in blocks of 256 rows)."""
    rows = chunk_elements // max(1, width)
    if device.type == "cpu":
        rows = min(rows, max(16, cpu_elements // max(1, width)))
    return max(1, rows)


def _row_blocks(n: int, rows: int):
    return ((start, min(start + rows, n)) for start in range(0, n, rows))


class _Scorer:
    """``||c||^2 - 2 x c^T`` (``[rows, K]``) for blocks of rows against fixed centroids ``[K, D]``:
    the squared distance minus the per-row constant ``||x||^2``.

    On the CPU (float32) the product goes through numpy's OpenBLAS into one reused buffer: for
    these tall-skinny products it measured ~1.5x faster than torch's CPU GEMM here. The returned
    block is only valid until the next call. Elsewhere it is one ``addmm``."""

    use_numpy = True  # tests switch it off to run the GPU code path on the CPU

    def __init__(self, centroids: torch.Tensor, block_rows: int):
        self.centroids = centroids
        self.c_sq = centroids.pow(2).sum(1)
        self.numpy = self.use_numpy and centroids.device.type == "cpu" and centroids.dtype == torch.float32
        if self.numpy:
            self.ct = np.ascontiguousarray((-2.0 * centroids.detach()).numpy().T)  # [D, K]
            self.buffer = np.empty((block_rows, centroids.shape[0]), dtype=np.float32)

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        if self.numpy:
            out = np.matmul(xb.detach().numpy(), self.ct, out=self.buffer[: xb.shape[0]])
            return torch.from_numpy(out).add_(self.c_sq)
        return torch.addmm(self.c_sq, xb, self.centroids.t(), beta=1.0, alpha=-2.0)

    def nearest(self, block: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Row-wise min of a block from :meth:`__call__` into ``values`` and ``indices``. On the CPU
        numpy's argmin + take measured ~3.5x faster than ``torch.min(dim)`` (K = 100..10,000)."""
        if self.numpy:
            arg = block.numpy().argmin(1)
            indices.copy_(torch.from_numpy(arg))
            values.copy_(torch.from_numpy(np.take_along_axis(block.numpy(), arg[:, None], 1)[:, 0]))
        else:
            torch.min(block, 1, out=(values, indices))


def _rows(x: torch.Tensor, start: int, end: int, index: Optional[torch.Tensor]) -> torch.Tensor:
    return x[start:end] if index is None else x.index_select(0, index[start:end])


def _row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """``||x_i||^2 [N]`` without an ``N x D`` temporary (4 GB at the paper's scale)."""
    return torch.linalg.vector_norm(x, dim=1).square_()


def assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    chunk_elements: int = 1 << 25,
    x_sq: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of ``x [N, D]``: ``(labels [N] int64, squared distance [N])``."""
    if x_sq is None:
        x_sq = _row_sq_norms(x)
    rows = _block_rows(max(centroids.shape[0], x.shape[1]), chunk_elements, x.device)
    scorer = _Scorer(centroids, rows)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start, end in _row_blocks(x.shape[0], rows):
        scorer.nearest(scorer(x[start:end]), dists[start:end], labels[start:end])
    return labels, dists.add_(x_sq).clamp_min_(0)


def _group_size(num_clusters: int, max_groups: int = 32) -> int:
    """Centroids per lower-bound group. Measured on the CPU (N = 50k): at K = 1000, 32 groups of
    32 took 15-20% less time than one group (Hamerly), 16 or 100 groups less gain; at K = 100 the
    [N, G] bookkeeping cost more than it saved (+12%), so below K = 256 there is one group.
    The cap bounds the memory: 32 floats per point (166 MB at N = 1.3M)."""
    groups = 1 if num_clusters < 256 else min(max_groups, num_clusters // 10)
    return -(-num_clusters // groups)


def _nearest_two(x, x_sq, centroids, chunk_elements, index=None, group: Optional[int] = None):
    """Nearest centroid, its distance, and per group of ``group`` consecutive centroids the
    distance to the nearest one other than the own (not squared), ``[n, G]``, for every row of
    ``x`` (or of the rows ``index``), block by block. One group: the second-nearest distance."""
    k = centroids.shape[0]
    group = k if group is None else group
    n_groups = -(-k // group)
    n = x.shape[0] if index is None else index.numel()
    rows = _block_rows(max(k, x.shape[1]), chunk_elements, x.device)
    scorer = _Scorer(centroids, rows)
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    first = torch.empty(n, dtype=x.dtype, device=x.device)
    lower = torch.full((n, n_groups), float("inf"), dtype=x.dtype, device=x.device)
    full = (n_groups - 1) * group  # columns of the equal-sized groups; the last one holds the rest
    for start, end in _row_blocks(n, rows):
        block = scorer(_rows(x, start, end, index))
        scorer.nearest(block, first[start:end], labels[start:end])
        if k > 1:  # mask the own centroid, then group minima: far cheaper than topk(2) on the CPU
            block.scatter_(1, labels[start:end].unsqueeze(1), float("inf"))
            if n_groups > 1:
                lower[start:end, : n_groups - 1] = block[:, :full].view(end - start, n_groups - 1, group).amin(2)
            lower[start:end, n_groups - 1] = block[:, full:].amin(1)
    x_sq = x_sq if index is None else x_sq.index_select(0, index)
    first.add_(x_sq).clamp_min_(0).sqrt_()
    lower.add_(x_sq.unsqueeze(1)).clamp_min_(0).sqrt_()
    return labels, first, lower


def _own_sq_distance(x, centroids, labels, chunk_elements, index=None) -> torch.Tensor:
    """``||x_i - c_{labels_i}||^2`` computed directly (exact, no cancellation), block by block;
    with ``index``, for those rows only (``labels`` then holds their labels)."""
    n = x.shape[0] if index is None else index.numel()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    rows = _block_rows(x.shape[1], chunk_elements, x.device, cpu_elements=1 << 18)
    for start, end in _row_blocks(n, rows):
        diff = _rows(x, start, end, index) - centroids.index_select(0, labels[start:end])
        torch.sum(diff.square_(), 1, out=out[start:end])
    return out


def kmeans_plusplus(x: torch.Tensor, num_clusters: int, generator: torch.Generator,
                    x_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy k-means++ centres ``[K, D]``: each new centre is the best of ``2 + log K``
    candidates drawn with probability proportional to the squared distance to the
    nearest centre chosen so far (the candidate that lowers the potential most wins).

    All uniform draws are made up front on the (CPU) ``generator`` and moved once; the
    loop stays on ``x``'s device with no host sync. Distances are laid out ``[trials, N]``
    (``c x^T``): contiguous rows for the potentials, measured ~20% faster on the CPU."""
    n = x.shape[0]
    if x_sq is None:
        x_sq = _row_sq_norms(x)
    trials = 2 + int(math.log(num_clusters))
    first = torch.randint(n, (1,), generator=generator).to(x.device)
    draws = torch.rand(max(0, num_clusters - 1), trials, generator=generator, dtype=torch.float64).to(x.device)
    centres = torch.empty(num_clusters, x.shape[1], dtype=x.dtype, device=x.device)
    centres[0:1] = x.index_select(0, first)
    xt = x.t().contiguous() if x.device.type == "cpu" else x.t()

    def sq_dist_to(points):  # [P, N]
        scores = torch.addmm(x_sq.unsqueeze(0), points, xt, alpha=-2.0)
        return scores.add_(points.pow(2).sum(1, keepdim=True)).clamp_min_(0)

    closest = sq_dist_to(centres[0:1])[0]
    for c in range(1, num_clusters):
        cumulative = closest.cumsum(0, dtype=torch.float64)  # float64: N terms, sampling needs the tail right
        candidates = torch.searchsorted(cumulative, draws[c - 1] * cumulative[-1]).clamp_(max=n - 1)
        points = x.index_select(0, candidates)
        candidate_closest = torch.minimum(sq_dist_to(points), closest.unsqueeze(0))
        best = candidate_closest.sum(1, dtype=torch.float64).argmin().view(1)
        closest = candidate_closest.index_select(0, best).squeeze(0)
        centres[c : c + 1] = points.index_select(0, best)
    return centres


def _checked_points(x: torch.Tensor, num_clusters: int, failures: Failures):
    """``(x as float32, ||x_i||^2, N over every rank)``, after this rank's checks of its ``x`` (an error
    there stops every rank at the count's all-reduce) and the checks of N."""
    rows = torch.zeros(1, dtype=torch.float64, device=x.device)  # what a rank whose checks failed sends
    with failures.held():
        if x.dim() != 2:
            raise ValueError(f"kmeans: x must be [N, D], got shape {tuple(x.shape)}")
        x = x.float().contiguous()
        x_sq = _row_sq_norms(x)
        _check_finite(x, x_sq)
        rows[0] = x.shape[0]
    n_total = int(_meet(rows, failures))
    if n_total == 0:
        raise ValueError("kmeans: x has no rows (empty dataset?)")
    if num_clusters < 1 or num_clusters > n_total:
        raise ValueError(f"kmeans: num_clusters={num_clusters} must be between 1 and the number of points N={n_total}")
    return x, x_sq, n_total


def _check_finite(x: torch.Tensor, x_sq: torch.Tensor) -> None:
    """NaN or inf anywhere in a row makes its squared norm non-finite: one O(N) check, no N x D mask."""
    if bool(torch.isfinite(x_sq).all()):
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError("kmeans: x contains NaN or inf values")
    raise ValueError("kmeans: x has rows whose squared norm overflows float32; rescale the features")


def _tolerance(x, x_sq, n_total, tol, distributed, failures: Optional[Failures] = None) -> float:
    """``tol * mean_d var(x[:, d])`` (scikit-learn's), as ``tol * (sum_i ||x_i - mean||^2) / (N D)``,
    from the first two moments, or in a second pass where they would cancel (an offset mean).
    A rank whose share fails sends zeros; the next flag (the initial centres') stops every rank."""
    failures = _failures(failures, x.device, distributed)
    sums = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    sq = torch.zeros(1, dtype=torch.float64, device=x.device)
    with failures.held():
        sums, sq = x.sum(0).double(), x_sq.sum(dtype=torch.float64).reshape(1)
    mean = _all_reduce(sums, distributed) / n_total
    sq_total = float(_all_reduce(sq, distributed))
    spread = sq_total - n_total * float(mean.square().sum())
    if spread < 1e-3 * sq_total:  # E||x||^2 - ||E x||^2 cancels: sum ||x - mean||^2 directly
        total = torch.zeros(1, dtype=torch.float64, device=x.device)
        if failures.error is None:  # a rank whose moments failed has not met the others since
            with failures.held():
                for start, end in _row_blocks(x.shape[0], max(1, (1 << 22) // max(1, x.shape[1]))):
                    total += (x[start:end] - mean.to(x.dtype)).square_().sum(dtype=torch.float64)
        spread = float(_all_reduce(total, distributed))
    return tol * max(spread, 0.0) / (n_total * max(1, x.shape[1]))


_INITS = ("k-means++", "random")


def _seeds(x, x_sq, num_clusters, generator, init, init_sample) -> torch.Tensor:
    """k-means++ (or random) centres ``[K, D]`` among ``init_sample`` random rows of ``x`` (0: all)."""
    sample, sample_sq = x, x_sq
    if 0 < init_sample < x.shape[0]:
        idx = torch.randperm(x.shape[0], generator=generator)[: max(init_sample, num_clusters)].to(x.device)
        sample, sample_sq = x.index_select(0, idx), x_sq.index_select(0, idx)
    if init == "random":
        idx = torch.randperm(sample.shape[0], generator=generator)[:num_clusters].to(x.device)
        return sample.index_select(0, idx)
    return kmeans_plusplus(sample, num_clusters, generator, sample_sq)


def _initial_centroids(x, x_sq, num_clusters, generator, init, init_sample, failures: Failures) -> torch.Tensor:
    """Rank 0's :func:`_seeds`, broadcast. Rank 0's count reaches every rank in an all-reduce that carries
    the failure flags of the work before (the tolerance's); rank 0's own flag travels with its centres."""
    if not failures.active:  # N >= K was checked
        return _seeds(x, x_sq, num_clusters, generator, init, init_sample)
    import torch.distributed as dist

    rank = dist.get_rank()
    held = int(_meet(torch.tensor([x.shape[0] if rank == 0 else 0], device=x.device), failures))
    if num_clusters > held:  # every rank stops here, instead of waiting for rank 0's centres
        raise ValueError(f"kmeans: rank 0 holds {held} points, fewer than num_clusters={num_clusters} "
                         "(its k-means++ seeds every rank's centres)")
    sent = torch.zeros(num_clusters + 1, x.shape[1], dtype=x.dtype, device=x.device)  # the last row: rank 0's flag
    if rank == 0:
        with failures.held():
            sent[:num_clusters] = _seeds(x, x_sq, num_clusters, generator, init, init_sample)
        sent[num_clusters, 0] = failures.flag()[0]
    dist.broadcast(sent, 0, group=failures.group)
    failures.raise_if(sent[num_clusters, :1])
    return sent[:num_clusters]


def _reseeds(counts, x, distances: Callable[[], torch.Tensor], failures: Failures):
    """New centres for the empty clusters (``counts`` summed over the ranks: the same on every rank): the
    points farthest from their centroid, the global top n of ``distances()`` ``[N]`` (the squared distance
    of each of this rank's points to its centroid, called only where a cluster is empty). Returns
    ``(clusters [n], points [n, D])``. A rank whose top n fails stops every rank at their gather."""
    empty = (counts == 0).nonzero().flatten()
    n_empty = int(empty.numel())
    if n_empty == 0:
        return empty, x.new_zeros(0, x.shape[1])
    m = min(n_empty, x.shape[0])
    far_d = torch.full((n_empty + 1,), -1.0, dtype=x.dtype, device=x.device)  # the last: this rank's flag
    far_x = torch.zeros(n_empty, x.shape[1], dtype=x.dtype, device=x.device)
    with failures.held():
        top_d, top_i = distances().topk(m)
        far_d[:m], far_x[:m] = top_d, x.index_select(0, top_i)
    if failures.active:
        import torch.distributed as dist

        far_d[-1] = failures.flag()[0]
        all_d = [torch.empty_like(far_d) for _ in range(failures.world)]
        dist.all_gather(all_d, far_d, group=failures.group)
        failures.raise_if(sum(d[-1:] for d in all_d))
        all_x = [torch.empty_like(far_x) for _ in range(failures.world)]
        dist.all_gather(all_x, far_x, group=failures.group)
        _, order = torch.cat([d[:-1] for d in all_d]).topk(n_empty)
        far_x = torch.cat(all_x)[order]
    else:
        far_x = far_x[:m]
    return empty[: far_x.shape[0]], far_x


def _half_gaps(centroids: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """``s_k = min_{j != k} ||c_k - c_j|| / 2``: a point closer than s_k to c_k keeps c_k (Hamerly 2010)."""
    k = centroids.shape[0]
    if k == 1:
        return torch.full((1,), float("inf"), dtype=centroids.dtype, device=centroids.device)
    c_sq = centroids.pow(2).sum(1)
    out = torch.empty(k, dtype=centroids.dtype, device=centroids.device)
    rows = max(1, chunk_elements // k)  # K = 10,000: a K x K matrix would be 400 MB
    for start, end in _row_blocks(k, rows):
        gaps = torch.addmm(c_sq, centroids[start:end], centroids.t(), alpha=-2.0)
        gaps[torch.arange(end - start, device=gaps.device), torch.arange(start, end, device=gaps.device)] = float("inf")
        torch.amin(gaps, 1, out=out[start:end])
        out[start:end] += c_sq[start:end]
    return out.clamp_min_(0).sqrt_().mul_(0.5)


def _reassign(x, x_sq, centroids, labels, upper, lower, moves, margin, chunk_elements, group) -> int:
    """Hamerly's step after the centroids moved by ``moves [K]``: loosen the bounds, then
    recompute only the points whose bounds no longer prove their assignment (in place).
    ``lower [N, G]`` holds one bound per group of centroids (Yinyang k-means, Ding et al.
    2015, global filter): a group's bound loosens by the largest move in that group only, not
    by the largest of all K (which, at K = 1000, made every other Hamerly step a dense pass).
    Returns how many points got the full O(K D) distance computation."""
    n, k = x.shape[0], moves.numel()
    upper += moves.index_select(0, labels)
    if lower.shape[1] == 1 and k > 1:  # one group: the largest move among the *other* centroids
        top, arg = moves.topk(2)
        lower -= torch.where(labels == arg[0], top[1], top[0]).unsqueeze(1)
    elif k > 1:
        padded = torch.zeros(lower.shape[1] * group, dtype=moves.dtype, device=moves.device)
        padded[:k] = moves
        lower -= padded.view(lower.shape[1], group).amax(1)
    bound = torch.maximum(lower.amin(1), _half_gaps(centroids, chunk_elements).index_select(0, labels))
    idx = (upper + margin > bound).nonzero().flatten()
    if 4 * idx.numel() > 3 * n:  # most points are unsure: one dense pass beats the gathers
        labels[:], upper[:], lower[:] = _nearest_two(x, x_sq, centroids, chunk_elements, group=group)
        return n
    if idx.numel() and centroids.shape[0] >= 256:  # tighten the upper bound: one distance instead of K
        # (measured on the CPU: pays from K ~ 1000, costs ~10% of the run at K = 100)
        tight = _own_sq_distance(x, centroids, labels.index_select(0, idx), chunk_elements, idx).sqrt_()
        upper.index_copy_(0, idx, tight)
        idx = idx[tight + margin > bound.index_select(0, idx)]
    if idx.numel():
        new_labels, new_upper, new_lower = _nearest_two(x, x_sq, centroids, chunk_elements, idx, group)
        labels.index_copy_(0, idx, new_labels)
        upper.index_copy_(0, idx, new_upper)
        lower.index_copy_(0, idx, new_lower)
    return int(idx.numel())


def _add_rows(sums, labels, x, rows=None, alpha=1.0):
    """``sums[labels[i]] += alpha * x[i]`` for ``i`` in ``rows`` (all if None). The rows are summed per
    cluster in ``x``'s dtype, then added to the float64 ``sums``, so repeated updates do not drift
    and no float64 copy of ``x`` is made (1.3M x 768 would be 8 GB)."""
    if rows is not None:
        labels, x = labels.index_select(0, rows), x.index_select(0, rows)
    sums += torch.zeros(sums.shape, dtype=x.dtype, device=x.device).index_add_(0, labels, x, alpha=alpha).double()
    return sums


def _lloyd(x, x_sq, centroids, max_iter, tol_abs, chunk_elements, distributed, log=None,
           failures: Optional[Failures] = None):
    """Lloyd iterations with Hamerly's bounds (Hamerly 2010): the same steps as plain Lloyd,
    skipping the distance computations of points that provably keep their centroid. ``upper``
    bounds the distance to the own centroid, ``lower`` the distance to every other one; centroid
    moves loosen both. ``margin`` absorbs float32 rounding of ``||x||^2 - 2 x.c + ||c||^2``.
    Returns centroids, labels (nearest final centroid) and their squared distances.

    ``distributed``: a rank whose work fails sends zero counts; every rank stops at the iteration's
    counts (or moved points) with :class:`~sgdm.annotation.ranks.RankFailed`, ``failures`` naming the stage."""
    failures = _failures(failures, x.device, distributed)
    k = centroids.shape[0]
    group = _group_size(k)
    local_counts = torch.zeros(k, dtype=torch.float64, device=x.device)  # what a rank that failed sends
    with failures.held():
        labels, upper, lower = _nearest_two(x, x_sq, centroids, chunk_elements, group=group)
        margin = 1e-3 * float(x_sq.max().sqrt()) if x.shape[0] else 0.0
        # per-cluster sums are updated by the points that changed cluster only (float64: no drift)
        local_sums = _add_rows(torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device), labels, x)
        local_counts = torch.bincount(labels, minlength=k).double()
        sums = torch.empty_like(local_sums)  # the all-reduce's buffer
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        counts = _meet(local_counts, failures)  # every rank stops here if one failed since the last meeting
        sums = _all_reduce(sums.copy_(local_sums), distributed)
        empty, seeds = _reseeds(counts, x, lambda: upper.square(), failures)
        n_changed = torch.zeros(1, dtype=torch.float64, device=x.device)  # what a rank that failed sends
        with failures.held():
            new = (sums / counts.clamp_min(1).unsqueeze(1)).to(x.dtype)
            new[empty] = seeds
            moves = (new - centroids).norm(dim=1)
            centroids = new
            previous = labels.clone()
            recomputed = _reassign(x, x_sq, centroids, labels, upper, lower, moves, margin, chunk_elements, group)
            changed = (labels != previous).nonzero().flatten()
            if changed.numel():
                _add_rows(local_sums, labels, x, changed)
                _add_rows(local_sums, previous, x, changed, alpha=-1.0)
                local_counts += torch.bincount(labels[changed], minlength=k) - torch.bincount(previous[changed], minlength=k)
            shift = float(moves.square().sum())
            n_changed[0] = changed.numel()
        moved = int(_meet(n_changed, failures))
        if log is not None:
            log(f"kmeans: iteration {n_iter}: centroid shift {shift:.3g} (tol {tol_abs:.3g}), "
                f"{recomputed} of {x.shape[0]} points recomputed, {moved} moved")
        if shift <= tol_abs or moved == 0:  # no label changed: the next step would not move a centroid
            break
    with failures.held():
        dists = _own_sq_distance(x, centroids, labels, chunk_elements)  # exact, O(N D): no final dense pass
    failures.settle()
    return centroids, labels, dists, n_iter


def _minibatch(x, x_sq, centroids, max_iter, tol_abs, batch_size, generator, chunk_elements, distributed,
               failures: Optional[Failures] = None):
    """Sculley's mini-batch k-means; ``max_iter`` counts passes over the data. ``distributed``: a rank whose
    step fails sends zero counts; every rank stops at that step's counts."""
    failures = _failures(failures, x.device, distributed)
    k = centroids.shape[0]
    totals = torch.zeros(k, dtype=x.dtype, device=x.device)
    steps = torch.tensor([max(1, math.ceil(x.shape[0] / batch_size))], device=x.device)
    dist = _dist() if distributed else None
    if dist is not None:  # every rank takes as many steps (all-reduces) as the one with most points; the others
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # take empty batches once theirs run out
    steps = int(steps)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        for s in range(steps):
            counts = torch.zeros(k, dtype=x.dtype, device=x.device)  # what a rank that failed sends
            with failures.held():
                if s == 0:
                    start_centroids = centroids.clone()
                    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
                idx = order[s * batch_size : (s + 1) * batch_size]
                xb = x.index_select(0, idx)
                labels, _ = assign(xb, centroids, chunk_elements, x_sq.index_select(0, idx))
                sums = torch.zeros_like(centroids).index_add_(0, labels, xb)
                counts = torch.bincount(labels, minlength=k).to(x.dtype)
            counts = _meet(counts, failures)  # every rank stops here if one failed since the last meeting
            _all_reduce(sums, distributed)
            totals += counts
            hit = counts > 0
            # c <- c + (sum_b - n_b c) / n_total: the running mean of every point seen so far
            centroids[hit] += (sums[hit] - counts[hit, None] * centroids[hit]) / totals[hit, None]
        # distances of every point only where a cluster is empty: nothing else reads them
        empty, seeds = _reseeds(totals, x, lambda: assign(x, centroids, chunk_elements, x_sq)[1], failures)
        if empty.numel():
            centroids[empty] = seeds
            totals.clamp_min_(1)
        if float((centroids - start_centroids).pow(2).sum()) <= tol_abs:
            break
    return centroids, n_iter


class _Clock:
    """Wall time per phase; on CUDA it synchronises at phase boundaries only."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._last = device, {}, time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = now - self._last
        self._last = now


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
    log: Optional[Callable[[str], None]] = None,
) -> KMeansResult:
    """Cluster ``x [N, D]`` into ``num_clusters`` groups; runs on ``x``'s device.

    ``tol`` is relative to the mean per-dimension variance of ``x`` (scikit-learn's
    convention): iterations stop once the summed squared centroid shift falls
    below ``tol * mean(var(x, 0))``. ``batch_size > 0`` selects mini-batch mode.
    ``distributed=True`` (inside ``torch.distributed``) treats the ranks' ``x``
    as one dataset; every rank gets the same centroids and its own labels. Where one rank's
    work fails, it raises its error and the others :class:`~sgdm.annotation.ranks.RankFailed`
    naming it, at the next collective (module docstring), instead of waiting for it.
    ``generator`` is a CPU generator; seed it identically on every rank.
    ``log`` (optional) gets one line per Lloyd iteration.
    ``init``: ``k-means++`` or ``random`` centres, chosen among ``init_sample`` random points
    (0: all); ``max_iter``: at most that many iterations (passes); ``chunk_elements``: at most
    that many distances are held at once (module docstring).

    Returns a :class:`KMeansResult`: centroids ``[K, D]`` float32, labels ``[N]`` int64 in [0, K).
    """
    if init not in _INITS:  # every rank, before any collective
        raise ValueError(f"kmeans: init must be 'k-means++' or 'random', got {init!r}")
    failures = Failures(_STAGE, x.device, distributed)
    clock = _Clock(x.device)
    x, x_sq, n_total = _checked_points(x, num_clusters, failures)
    tol_abs = _tolerance(x, x_sq, n_total, tol, distributed, failures)
    clock.lap("setup")
    centroids = _initial_centroids(x, x_sq, num_clusters, generator, init, init_sample, failures)
    clock.lap("init")
    if batch_size > 0:
        centroids, n_iter = _minibatch(x, x_sq, centroids, max_iter, tol_abs, batch_size, generator, chunk_elements,
                                       distributed, failures)
        with failures.held():
            labels, dists = assign(x, centroids, chunk_elements, x_sq)
        failures.settle()
    else:
        centroids, labels, dists, n_iter = _lloyd(x, x_sq, centroids, max_iter, tol_abs, chunk_elements, distributed,
                                                  log, failures)
    inertia = _all_reduce(dists.sum(dtype=torch.float64).reshape(1), distributed)
    clock.lap("iterations")
    return KMeansResult(centroids=centroids, labels=labels, inertia=float(inertia), n_iter=n_iter, seconds=clock.seconds)


def kmeans_from_config(x: torch.Tensor, num_clusters: int, cfg, generator: torch.Generator,
                       distributed: bool = False, log: Optional[Callable[[str], None]] = None) -> KMeansResult:
    """:func:`kmeans` with the parameters of a :class:`~sgdm.annotation.config.KMeansConfig`."""
    return kmeans(
        x,
        num_clusters,
        generator=generator,
        max_iter=cfg.max_iter,
        tol=cfg.tol,
        init=cfg.init,
        init_sample=cfg.init_points_per_cluster * num_clusters,
        batch_size=cfg.batch_size,
        chunk_elements=cfg.chunk_elements,
        distributed=distributed,
        log=log,
    )
