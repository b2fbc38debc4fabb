"""dense_crf: exact mean-field of the fully connected CRF, against a loop over cell pairs; the lattice
messages (method: lattice) against the exact ones."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sgdm.annotation.config import CRFConfig
from sgdm.annotation.crf import dense_crf, scaled


def reference_crf(image, probs, p: CRFConfig):
    """Mean-field written out cell pair by cell pair, in float64. ``normalization: none``: the raw sums
    over ``j != i``; ``symmetric`` (pydensecrf's NORMALIZE_SYMMETRIC): each kernel's sum over every j,
    ``i`` included, weighted by ``1 / sqrt(d_i d_j)`` with ``d_i`` the kernel's own sum of ones."""
    k, h, w = probs.shape
    cells = [(r, c) for r in range(h) for c in range(w)]
    unary = -torch.log(probs.double().clamp_min(1e-10))
    q = torch.softmax(-unary, dim=0)
    rgb = image.double() * 255

    def kernels(i, j):  # (position kernel, bilateral kernel) of cells i and j
        (ri, ci), (rj, cj) = i, j
        d2 = (ri - rj) ** 2 + (ci - cj) ** 2
        c2 = float(((rgb[:, ri, ci] - rgb[:, rj, cj]) ** 2).sum())
        return (math.exp(-d2 / (2 * p.pos_xy_std ** 2)),
                math.exp(-d2 / (2 * p.bi_xy_std ** 2) - c2 / (2 * p.bi_rgb_std ** 2)))

    symmetric = p.normalization == "symmetric"
    degree = {i: [sum(kernels(i, j)[m] for j in cells) for m in (0, 1)] for i in cells}
    for _ in range(p.iterations):
        message = torch.zeros_like(q)
        for i in cells:
            for j in cells:
                if i == j and not symmetric:
                    continue
                kern = kernels(i, j)
                if symmetric:
                    kern = [kern[m] / math.sqrt(degree[i][m] * degree[j][m]) for m in (0, 1)]
                message[:, i[0], i[1]] += (p.pos_weight * kern[0] + p.bi_weight * kern[1]) * q[:, j[0], j[1]]
        q = torch.softmax(-unary + message, dim=0)
    return q


def random_inputs(k=3, h=4, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g), torch.softmax(2 * torch.randn(k, h, w, generator=g), dim=0)


@pytest.mark.parametrize("normalization", ["symmetric", "none"])
def test_matches_the_pairwise_loop_and_does_not_depend_on_the_block_size(normalization):
    image, probs = random_inputs()
    params = CRFConfig(iterations=4, pos_weight=1.5, pos_xy_std=1.3, bi_weight=2.0, bi_xy_std=3.0, bi_rgb_std=40.0,
                       normalization=normalization)
    expected = reference_crf(image, probs, params)
    for block in (1, 7, 4096):
        got = dense_crf(image.double(), probs.double(), params, block_rows=block)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(expected, probs.double(), atol=1e-3)  # the pairwise term did something


def test_without_pairwise_weight_or_iterations_the_probabilities_come_back():
    image, probs = random_inputs()
    for params in (CRFConfig(iterations=0), CRFConfig(pos_weight=0.0, bi_weight=0.0)):
        torch.testing.assert_close(dense_crf(image, probs, params), probs, rtol=0, atol=1e-6)


def test_an_isolated_cell_takes_its_neighbours_label():
    h, w = 8, 8
    image = torch.zeros(3, h, w)
    probs = torch.full((2, h, w), 0.1)
    probs[0] = 0.9
    probs[:, 2, 1] = torch.tensor([0.3, 0.7])  # one noisy cell
    params = CRFConfig(iterations=5, pos_weight=3.0, pos_xy_std=1.0, bi_weight=0.0)
    assert probs.argmax(0)[2, 1] == 1
    assert (dense_crf(image, probs, params).argmax(0) == 0).all()


def test_the_label_boundary_moves_to_the_colour_edge():
    """The classes change between columns 4 and 5, the colour between 3 and 4: the bilateral kernel
    gives column 4 (white, unsure) the class of the confident white cells; without it, it keeps its own."""
    h, w = 6, 8
    image = torch.zeros(3, h, w)
    image[:, :, 4:] = 1.0
    p1 = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.3, 0.8, 0.9, 0.9]).expand(h, w)
    probs = torch.stack([1 - p1, p1])
    columns = {}
    for bi_weight in (0.0, 4.0):
        params = CRFConfig(iterations=5, pos_weight=3.0, pos_xy_std=1.0, bi_weight=bi_weight, bi_xy_std=3.0,
                           bi_rgb_std=13.0)
        labels = dense_crf(image, probs, params).argmax(0)
        assert (labels == labels[0]).all()  # the same in every row
        columns[bi_weight] = labels[0].tolist()
    assert columns[0.0] == [0, 0, 0, 0, 0, 1, 1, 1] and columns[4.0] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("bad, match", [
    (dict(iterations=-1), "iterations"), (dict(iterations=1.5), "iterations"), (dict(pos_weight=-1.0), "pos_weight"),
    (dict(bi_weight=float("nan")), "bi_weight"), (dict(pos_xy_std=0.0), "pos_xy_std"),
    (dict(bi_rgb_std=float("inf")), "bi_rgb_std"), (dict(method="permutohedral"), "method"),
])
def test_bad_params_are_named(bad, match):
    image, probs = random_inputs()
    with pytest.raises(ValueError, match=f"^{match}: must"):
        dense_crf(image, probs, CRFConfig(**bad))


def test_bad_inputs_are_named():
    image, probs = random_inputs()
    with pytest.raises(ValueError, match="probs: expected"):
        dense_crf(image, probs[0])
    with pytest.raises(ValueError, match=r"image: expected \[3, 4, 5\]"):
        dense_crf(image[:, :3], probs)
    with pytest.raises(ValueError, match="probs: expected finite"):
        dense_crf(image, probs * float("nan"))
    with pytest.raises(ValueError, match="block_rows"):
        dense_crf(image, probs, block_rows=0)


def test_scaled_params_widen_the_spatial_kernels_only():
    p = scaled(CRFConfig(), 0.25)
    assert (p.pos_xy_std, p.bi_xy_std, p.bi_rgb_std, p.pos_weight) == (0.25, 67.0 / 4, 3.0, 3.0)


def structured_inputs(side, seed=0):
    """Three colour regions (a half, a disc, a band) with slight noise, and class probabilities that
    follow them under heavy noise (about a third of the cells' argmax wrong)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    image = torch.stack([(xx > 0.4).float(), ((xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.08).float(),
                         0.5 * (yy > 0.7).float()])
    image = (image + 0.03 * torch.randn(3, side, side, generator=g)).clamp(0, 1)
    truth = (image[0] > 0.5).long() + 2 * (image[1] > 0.5).long()
    logits = 2.0 * torch.nn.functional.one_hot(truth, 4).permute(2, 0, 1)
    logits = logits + 1.5 * torch.randn(4, side, side, generator=g)
    return image, torch.softmax(logits, 0), truth


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_lattice_labels_agree_with_the_exact_ones(factor, one_thread):
    # measured (symmetric normalisation) at 32 x 32: factor 1 99.9% of cells agree, factor 0.5 99.5%; 64 x 64 at 0.25 99.2%
    image, probs, truth = structured_inputs(32)
    params = scaled(CRFConfig(), factor)
    exact = dense_crf(image, probs, params).argmax(0)
    lattice = dense_crf(image, probs, dataclasses.replace(params, method="lattice")).argmax(0)
    assert (probs.argmax(0) == truth).float().mean() < 0.7 < 0.98 < (exact == truth).float().mean()
    assert (lattice == exact).float().mean() > 0.98


def test_lattice_cleans_an_isolated_cell_and_keeps_no_pairwise_term_as_is():
    h, w = 8, 8
    image = torch.zeros(3, h, w)
    probs = torch.full((2, h, w), 0.1)
    probs[0] = 0.9
    probs[:, 2, 1] = torch.tensor([0.3, 0.7])
    params = CRFConfig(iterations=5, pos_weight=3.0, pos_xy_std=1.0, bi_weight=0.0, method="lattice")
    assert (dense_crf(image, probs, params).argmax(0) == 0).all()
    off = dataclasses.replace(params, pos_weight=0.0)
    torch.testing.assert_close(dense_crf(image, probs, off), probs, rtol=0, atol=1e-6)


def test_the_default_crf_weighs_the_unary_against_the_neighbours_not_their_number():
    """STEGO's CRF (pydensecrf, symmetric normalisation): a message is a weighted average of the
    neighbours' labels, at most a few units, so a confident segment survives inside a region of its
    colour. Raw sums (``normalization: none``) grow with the number of same-colour cells (~500 here),
    and the region's majority erases the segment whatever its unary says."""
    side = 32
    image = torch.zeros(3, side, side)
    image[0, :, : side // 2] = 0.8  # red left half, blue right half
    image[2, :, side // 2 :] = 0.8
    probs = torch.full((2, side, side), 0.1)
    probs[0] = 0.9
    probs[:, 10:14, 4:8] = torch.tensor([0.001, 0.999])[:, None, None]  # a confident 4 x 4 segment of class 1
    params = scaled(CRFConfig(), side / 128)  # STEGO's kernels, a 128-pixel image drawn on 32 x 32 cells
    labels = dense_crf(image, probs, params).argmax(0)
    assert (labels[10:14, 4:8] == 1).all() and int(labels.sum()) == 16
    raw = dense_crf(image, probs, dataclasses.replace(params, normalization="none")).argmax(0)
    assert (raw == 0).all()
    lattice = dense_crf(image, probs, dataclasses.replace(params, method="lattice")).argmax(0)
    assert torch.equal(lattice, labels)
