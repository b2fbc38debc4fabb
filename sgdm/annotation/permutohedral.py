"""Gaussian filtering of scattered points in O(N) on the permutohedral lattice (Adams, Baek & Davis,
"Fast High-Dimensional Filtering Using the Permutohedral Lattice", Eurographics 2010), the
approximation pydensecrf uses for the fully connected CRF's messages.

:func:`gaussian_filter` approximates, for features ``f`` ``[N, d]`` and values ``v`` ``[N, C]``::

    out_i = sum_{j != i} exp(-|f_i - f_j|^2 / 2) v_j

the sum :func:`sgdm.annotation.crf.dense_crf` computes exactly (``include_self=True`` adds the
``j = i`` term). Each point is embedded in the hyperplane ``sum x = 0`` of R^{d+1}, tiled by the
lattice ``A*_d`` whose cells are simplices; the point's value is *splatted* onto the d+1 vertices of
its simplex with its barycentric weights, the lattice is *blurred* with ``[1 2 1] / 2`` along each of
its d+1 directions in turn, and each point *slices* its value back from the same vertices with the
same weights. Only vertices that received a splat exist (at most N (d+1) of them), so the cost is
linear in N; everything is tensor operations (sort, unique, searchsorted, index_add, gather), on any
device.

The lattice spacing fixes the width of the blur; the features are scaled by
``sqrt(2/3) (d+1) / sqrt((k+1)(k+2))`` (coordinate k) so that it approximates the unit-std Gaussian,
and the result by ``1 / (1 + 2^-d)`` so that a point on a vertex keeps weight 1 for itself (the
blur's d+1 steps along every direction add up to zero, a second path back). The lattice's own
weight of each point for itself (a function of its barycentric weights only) is subtracted unless
``include_self``: the remaining sum holds only the other points' values, and for non-negative values
stays non-negative.

Accuracy, measured against the exact sums (``tests/annotation/test_permutohedral.py``,
``benchmarks/crf_bench.py``): a few per cent relative error where the sums are dense, more where a
point has few neighbours within a std; a Gaussian filter, not an exact one.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["Lattice", "gaussian_filter"]

# keys are encoded as one int64 per vertex when the lattice's extent allows it (2^62 codes)
_MAX_CODES = 1 << 62


def gaussian_filter(features: torch.Tensor, values: torch.Tensor, include_self: bool = False) -> torch.Tensor:
    """``[N, C]``: approximately ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` over ``j != i`` (every j with
    ``include_self``), for ``features`` ``[N, d]`` (already divided by the kernel's widths) and
    ``values`` ``[N, C]`` on the same device; in the floating dtype of ``features``. To filter
    several value sets with the same features, build the :class:`Lattice` once."""
    return Lattice(features).filter(values, include_self)


class Lattice:
    """The permutohedral lattice of ``features`` ``[N, d]`` (finite, floating; d >= 1): each
    point's simplex and barycentric weights and the vertices' neighbours, for :meth:`filter`."""

    def __init__(self, features: torch.Tensor):
        if features.dim() != 2 or features.shape[1] < 1:
            raise ValueError(f"features: expected [N, d] with d >= 1, got shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"features: expected a floating dtype, got {features.dtype}")
        if not torch.isfinite(features).all():
            raise ValueError("features: expected finite numbers")
        self.n, self.d = features.shape
        self.dtype, self.device = features.dtype, features.device
        if self.n == 0:
            return
        vertex, self.weight = _simplices(features)  # [N, d+1, d] int64, [N, d+1]
        ids, self.neighbours = _lattice(vertex.reshape(-1, self.d))
        self.ids = ids.reshape(self.n, self.d + 1)
        self.vertices = self.neighbours.shape[2]
        self.alpha = 1.0 / (1.0 + 2.0 ** -self.d)  # a point on a vertex keeps weight 1 for itself
        table = _self_weights(self.d, self.dtype, self.device)
        self.self_weight = self.alpha * torch.einsum("nr,rs,ns->n", self.weight, table, self.weight)

    def filter(self, values: torch.Tensor, include_self: bool = False) -> torch.Tensor:
        """``[N, C]``: the Gaussian sums of ``values`` ``[N, C]`` (see :func:`gaussian_filter`)."""
        if values.dim() != 2 or values.shape[0] != self.n:
            raise ValueError(f"values: expected [{self.n}, C] (a row per point of the features), "
                             f"got shape {tuple(values.shape)}")
        if values.device != self.device:
            raise ValueError(f"values are on {values.device}, the features on {self.device}")
        if self.n == 0:
            return values.to(self.dtype, copy=True)
        d, m = self.d, self.vertices
        values = values.to(self.dtype)
        lattice = values.new_zeros(m + 1, values.shape[1])  # row m: the missing neighbour, always zero
        splat = (self.weight[:, :, None] * values[:, None, :]).reshape(-1, values.shape[1])
        lattice.index_add_(0, self.ids.reshape(-1), splat)
        for minus, plus in self.neighbours:  # [1 2 1] / 2 along each of the d+1 directions in turn
            blurred = lattice[minus] + lattice[plus]
            lattice[:m] += 0.5 * blurred
        out = self.alpha * torch.einsum("nr,nrc->nc", self.weight, lattice[self.ids])
        if not include_self:
            self_weight = self.self_weight
            if (values >= 0).all():
                # the table counts every path of the blur, but one through a vertex that no point
                # splatted onto is lost: an isolated point keeps less than the table says. With
                # non-negative values each channel's sum bounds the point's own part from above.
                bound = torch.where(values > 0, out / values, torch.full_like(out, math.inf)).amin(1)
                self_weight = torch.minimum(self_weight, bound)
            out = out - self_weight[:, None] * values
        return out / _mass(d)


def _simplices(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point, the d+1 vertices of its enclosing lattice simplex, as their first d coordinates
    (the last is minus their sum) ``[N, d+1, d]`` int64, and its barycentric weights ``[N, d+1]``."""
    n, d = f.shape
    k = torch.arange(d, device=f.device, dtype=f.dtype)
    scale = math.sqrt(2.0 / 3.0) * (d + 1) / torch.sqrt((k + 1) * (k + 2))
    cf = f * scale
    # elevate onto sum x = 0 in R^{d+1}: x_0 = S_0, x_i = S_i - i cf_{i-1}, S_i = sum_{k >= i} cf_k
    suffix = torch.cat([cf.flip(1).cumsum(1).flip(1), cf.new_zeros(n, 1)], dim=1)  # [N, d+1]
    elevated = suffix.clone()
    elevated[:, 1:] -= torch.arange(1, d + 1, device=f.device, dtype=f.dtype) * cf
    # nearest point of the sublattice (d+1) Z^{d+1}, then back onto sum x = 0 by the ranks
    rem0 = torch.round(elevated / (d + 1)) * (d + 1)
    shift = (rem0.sum(1) / (d + 1)).round().long()  # how far off the hyperplane, in units of d+1
    residual = elevated - rem0
    # rank of each coordinate's residual, largest first (ties: the earlier coordinate first)
    order = torch.argsort(-residual, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(d + 1, device=f.device).expand(n, d + 1))
    rank = rank + shift[:, None]
    low, high = rank < 0, rank > d
    rank = rank + (d + 1) * low.long() - (d + 1) * high.long()
    rem0 = rem0 + (d + 1) * low.to(f.dtype) - (d + 1) * high.to(f.dtype)
    residual = (elevated - rem0) / (d + 1)
    bary = f.new_zeros(n, d + 2)
    bary.scatter_add_(1, d - rank, residual)
    bary.scatter_add_(1, d + 1 - rank, -residual)
    bary[:, 0] += 1.0 + bary[:, d + 1]
    # vertex r: rem0 + the canonical simplex's vertex r, permuted by the ranks
    canonical = _canonical(d, f.device)  # [d+1 (r), d+1 (rank)]
    vertex = rem0.round().long()[:, None, :] + canonical[:, rank].permute(1, 0, 2)  # [N, d+1, d+1]
    return vertex[:, :, :d], bary[:, : d + 1]


@functools.lru_cache(maxsize=None)
def _canonical_cpu(d: int) -> torch.Tensor:
    r = torch.arange(d + 1)[:, None]
    j = torch.arange(d + 1)[None, :]
    return torch.where(j <= d - r, r, r - (d + 1))


def _canonical(d: int, device: torch.device) -> torch.Tensor:
    """``[d+1, d+1]``: coordinate at rank j of the canonical simplex's vertex r (r or r - (d+1))."""
    return _canonical_cpu(d).to(device)


def _directions(d: int) -> torch.Tensor:
    """``[d+1, d]``: the lattice's d+1 directions ``(d+1) e_j - 1``, first d coordinates."""
    return (d + 1) * torch.eye(d + 1, d, dtype=torch.long) - 1


def _lattice(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For vertex keys ``[R, d]``: each one's index among the M distinct vertices ``[R]``, and for
    each direction the indices of every vertex's neighbours one step back and forward,
    ``[d+1, 2, M]``, M where the neighbour is not a vertex (no point splatted there)."""
    d = keys.shape[1]
    steps = _directions(d).to(keys.device)
    low = keys.amin(0) - (d + 1)  # room for a step either way
    span = keys.amax(0) + (d + 1) - low + 1
    if math.prod(span.tolist()) < _MAX_CODES:  # one int64 per key, linear in the key
        stride = torch.cat([span.new_ones(1), span[:-1].cumprod(0)])
        codes, ids = torch.unique((keys - low) @ stride, sorted=True, return_inverse=True)
        wanted = codes[None, None, :] + torch.stack([-steps, steps], dim=1) @ stride[:, None]  # [d+1, 2, M]
    else:  # too wide for one int64: number the distinct keys and their neighbours together
        unique, ids = torch.unique(keys, dim=0, return_inverse=True)
        rows = unique[None, None] + torch.stack([-steps, steps], dim=1)[:, :, None, :]  # [d+1, 2, M, d]
        _, numbered = torch.unique(torch.cat([unique, rows.reshape(-1, d)]), dim=0, return_inverse=True)
        codes, wanted = numbered[: len(unique)], numbered[len(unique):].reshape(rows.shape[:3])
    m = codes.shape[0]
    at = torch.searchsorted(codes, wanted).clamp_max_(m - 1)
    neighbours = torch.where(codes[at] == wanted, at, torch.full_like(at, m))
    return ids, neighbours


@functools.lru_cache(maxsize=None)
def _self_weights_cpu(d: int) -> torch.Tensor:
    """``[d+1, d+1]`` float64: the blur's weight from vertex r to vertex s of one simplex, every
    lattice vertex present. A path takes -1, 0 or +1 steps along each direction, 0.5 a step, and
    steps ``c`` and ``c + 1`` move alike (the directions add up to zero): vertex s - vertex r is
    ``|s - r|`` distinct steps back, or the other ``d + 1 - |s - r|`` forward, and a vertex reaches
    itself by no step, or one along every direction either way."""
    gap = (torch.arange(d + 1)[:, None] - torch.arange(d + 1)[None, :]).abs().double()
    return torch.where(gap == 0, 1.0 + 2.0 * 0.5 ** (d + 1), 0.5 ** gap + 0.5 ** (d + 1 - gap))


def _self_weights(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _self_weights_cpu(d).to(device, dtype)


@functools.lru_cache(maxsize=None)
def _mass(d: int) -> float:
    """The lattice filter's total weight over the unit-std Gaussian's, ``(2 pi)^(d/2)``, for evenly
    spread points: ``2^(d+1)`` from the blur, ``1 / (1 + 2^-d)`` from the vertex normalisation,
    and the volume of feature space per lattice vertex (the directions' covolume in the hyperplane
    over the elevation's volume factor). 0.92 at d = 1, 0.88 at 2, 0.71 at 5: dividing by it makes
    the sums over many points right, where the vertex normalisation alone would leave them short."""
    steps = _directions(d).double()
    steps = torch.cat([steps, -steps.sum(1, keepdim=True)], dim=1)  # [d+1, d+1], rows on sum x = 0
    cover = torch.linalg.det(steps[:d] @ steps[:d].t()).sqrt()
    k = torch.arange(d, dtype=torch.float64)
    scale = math.sqrt(2.0 / 3.0) * (d + 1) / torch.sqrt((k + 1) * (k + 2))
    # elevation of the unit vectors, as in _simplices: x_0 = S_0, x_i = S_i - i cf_{i-1}
    cf = torch.diag(scale)  # row i: the features e_i, scaled
    suffix = torch.cat([cf.flip(1).cumsum(1).flip(1), cf.new_zeros(d, 1)], dim=1)
    elevation = suffix.clone()
    elevation[:, 1:] -= torch.arange(1, d + 1, dtype=torch.float64) * cf
    volume = cover / torch.linalg.det(elevation @ elevation.t()).sqrt()
    return float(2.0 ** (d + 1) * volume / (1.0 + 2.0 ** -d) / (2.0 * math.pi) ** (d / 2))
