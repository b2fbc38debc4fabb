"""Fully connected CRF refinement of class maps (Kraehenbuehl & Koltun, NeurIPS 2011), as STEGO
refines its cluster-probe output.

Energy over labels ``x`` of the N cells of a grid, with unary ``U_i(l) = -log p_i(l)`` and a Potts
pairwise term over every pair of cells::

    E(x) = sum_i U_i(x_i) + sum_{i<j} [x_i != x_j] (w_pos k_pos(i, j) + w_bi k_bi(i, j))
    k_pos(i, j) = exp(-|r_i - r_j|^2 / (2 s_pos^2))
    k_bi(i, j)  = exp(-|r_i - r_j|^2 / (2 s_xy^2) - |I_i - I_j|^2 / (2 s_rgb^2))

with ``r`` the cell position (in cells) and ``I`` its colour (0-255, as pydensecrf's ``rgbim``).
Mean-field inference starts at ``Q = p`` and repeats ``Q_i(l) ∝ exp(-U_i(l) + M_i(l))`` (the Potts
term's part that is the same for every label cancels in the normalisation), with the message ``M``
per ``normalization``:

* ``symmetric`` (the default; pydensecrf's ``NORMALIZE_SYMMETRIC``, what STEGO runs): each kernel is
  normalised by its degrees, ``M_i = sum_k w_k sum_j k(i, j) Q_j / sqrt(d_i d_j)`` with
  ``d_i = sum_j k(i, j)``, both sums over every ``j`` including ``i`` (``k(i, i) = 1``), as
  pydensecrf's lattice computes them. A message is then a weighted average of the neighbours'
  ``Q`` (at most ``w_k`` per kernel), whatever the grid's size: STEGO's weights keep their meaning
  on any ``mask_size``.
* ``none``: the paper's equations as written, ``M_i = sum_{j != i} K(i, j) Q_j``. The message grows
  with the number of similar cells (on a 64 x 64 grid with STEGO's kernels, hundreds to thousands
  of times the unary's range), so the unary hardly counts; kept for segmenters made before
  ``normalization`` existed.

With ``method: exact`` (the reference) the message is computed exactly, a block of rows of ``K`` at
a time: O(N^2) per iteration, which is what the grids of self-segmentation (the patch grid or a few
times finer, N <= ~10^4) afford. ``method: lattice`` approximates the same sums in O(N) on the
permutohedral lattice, as pydensecrf does (:mod:`sgdm.annotation.permutohedral`; the ``j = i``
term left out or kept as above).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from sgdm.annotation.config import CRFConfig
from sgdm.annotation.permutohedral import Lattice

__all__ = ["dense_crf", "scaled"]


def scaled(params: CRFConfig, factor: float) -> CRFConfig:
    """The same kernels on a grid ``factor`` times as fine per side (cell distances scale)."""
    return dataclasses.replace(params, pos_xy_std=params.pos_xy_std * factor, bi_xy_std=params.bi_xy_std * factor)


def _features(image: torch.Tensor, params: CRFConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell: (position / s_pos [N, 2], (position / s_xy, colour / s_rgb) [N, 5]), float64."""
    _, h, w = image.shape
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).to(image.device)
    colour = image.reshape(3, -1).t().to(torch.float64) * 255.0
    return pos / params.pos_xy_std, torch.cat([pos / params.bi_xy_std, colour / params.bi_rgb_std], dim=1)


def _gaussian_rows(f: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """exp(-|f_i - f_j|^2 / 2) for rows i in [lo, hi), every j, with the diagonal (j = i) zero."""
    # in place: each temporary of a block is as large as the block (32x32 grid, one CPU thread:
    # 38 ms -> 16 ms a kernel)
    k = torch.cdist(f[lo:hi], f).square_().mul_(-0.5).exp_()
    k[torch.arange(hi - lo, device=f.device), torch.arange(lo, hi, device=f.device)] = 0.0
    return k


def _degree_norms(f: torch.Tensor, block_rows: int) -> torch.Tensor:
    """``1 / sqrt(d_i)`` with ``d_i = 1 + sum_{j != i} exp(-|f_i - f_j|^2 / 2)`` ``[N]``, a block of rows at a time."""
    n = f.shape[0]
    degree = torch.cat([_gaussian_rows(f, lo, min(n, lo + block_rows)).sum(1) for lo in range(0, n, block_rows)])
    return degree.add_(1.0).rsqrt_()


def dense_crf(image: torch.Tensor, probs: torch.Tensor, params: Optional[CRFConfig] = None,
              block_rows: int = 2048) -> torch.Tensor:
    """Mean-field marginals ``[K, H, W]`` of the CRF with unary ``-log probs``.

    ``params``: the weights, widths (in cells of this grid: :func:`scaled` converts widths in
    image pixels) and iterations of :class:`~sgdm.annotation.config.CRFConfig` (default: STEGO's);
    its ``enabled`` and ``alpha`` are the caller's.

    ``image``: ``[3, H, W]`` in [0, 1] on the grid of ``probs`` (``[K, H, W]``, each cell's class
    probabilities, e.g. a softmax over negative distances to the centroids). Computed in float64;
    returned in ``probs``' dtype. ``block_rows`` bounds memory (a block is ``block_rows x H W``);
    where it covers every cell the kernel is built once, else a block at a time every iteration.
    With ``params.method == "lattice"`` the messages come from the permutohedral lattice instead
    (O(H W) memory and time; ``block_rows`` unused).
    """
    if probs.dim() != 3:
        raise ValueError(f"probs: expected [K, H, W], got shape {tuple(probs.shape)}")
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1:] != probs.shape[1:]:
        raise ValueError(f"image: expected [3, {probs.shape[1]}, {probs.shape[2]}] (the grid of probs), "
                         f"got shape {tuple(image.shape)}")
    if image.device != probs.device:
        raise ValueError(f"image is on {image.device}, probs on {probs.device}")
    if block_rows < 1:
        raise ValueError(f"block_rows: expected >= 1, got {block_rows}")
    params = CRFConfig() if params is None else params
    params.validate()
    k, h, w = probs.shape
    n = h * w
    p = probs.reshape(k, n).t().to(torch.float64)
    if not (torch.isfinite(p).all() and (p >= 0).all()):
        raise ValueError("probs: expected finite, non-negative class probabilities")
    unary = -torch.log(p.clamp_min(1e-10))
    q = torch.softmax(-unary, dim=1)
    if params.iterations == 0 or (params.pos_weight == 0 and params.bi_weight == 0):
        return q.t().reshape(k, h, w).to(probs.dtype)
    f_pos, f_bi = _features(image, params)
    symmetric = params.normalization == "symmetric"
    kernels = [(weight, f) for weight, f in ((params.pos_weight, f_pos), (params.bi_weight, f_bi)) if weight > 0]
    if params.method == "lattice":
        lattices = [(weight, Lattice(f)) for weight, f in kernels]
        if symmetric:  # the degrees from the same lattice: its approximations (and its mass) cancel
            ones = q.new_ones(n, 1)
            norms = [lattice.filter(ones, include_self=True).clamp_min_(1e-20).rsqrt_() for _, lattice in lattices]
        for _ in range(params.iterations):
            if symmetric:
                message = sum(weight * norm * lattice.filter(norm * q, include_self=True)
                              for (weight, lattice), norm in zip(lattices, norms))
            else:
                message = sum(weight * lattice.filter(q) for weight, lattice in lattices)
            q = torch.softmax(-unary + message, dim=1)
        return q.t().reshape(k, h, w).to(probs.dtype)
    norms = [_degree_norms(f, block_rows) for _, f in kernels] if symmetric else []

    def kernel_rows(lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the message operator: ``M[lo:hi] = rows @ Q``."""
        rows = None
        for index, (weight, f) in enumerate(kernels):
            block = _gaussian_rows(f, lo, hi)
            if symmetric:
                block[torch.arange(hi - lo, device=q.device), torch.arange(lo, hi, device=q.device)] = 1.0
                block.mul_(norms[index][lo:hi, None]).mul_(norms[index][None, :])
            rows = block.mul_(weight) if rows is None else rows.add_(block, alpha=weight)
        return rows

    # one block holds all of K: built once, not every iteration (the exponentials cost ~8x the
    # product with Q; measured at 32x32 on a loaded 2-core CPU: 2.1 s -> 0.3 s per image)
    whole = kernel_rows(0, n) if block_rows >= n else None
    for _ in range(params.iterations):
        if whole is not None:
            message = whole @ q
        else:
            message = torch.empty_like(q)
            for lo in range(0, n, block_rows):
                hi = min(n, lo + block_rows)
                message[lo:hi] = kernel_rows(lo, hi) @ q
        q = torch.softmax(-unary + message, dim=1)
    return q.t().reshape(k, h, w).to(probs.dtype)
