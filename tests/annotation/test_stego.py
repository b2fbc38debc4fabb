import itertools

import pytest
import torch
import torch.nn.functional as F

from sgdm.annotation.config import StegoConfig
from sgdm.annotation.stego import SegmentationHead, correlation, correspondence_loss, knn_partners, segment, stego_loss


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def direct_loss(f1, f2, c1, c2, shift, pointwise):
    """STEGO's L_corr written out with loops over every location pair (float64)."""
    b, _, h, w = f1.shape
    _, _, i_, j_ = f2.shape
    fd = torch.zeros(b, h, w, i_, j_, dtype=torch.float64)
    cd = torch.zeros_like(fd)
    for n, y, x, i, j in itertools.product(range(b), range(h), range(w), range(i_), range(j_)):
        fd[n, y, x, i, j] = F.cosine_similarity(f1[n, :, y, x], f2[n, :, i, j], dim=0)
        cd[n, y, x, i, j] = F.cosine_similarity(c1[n, :, y, x], c2[n, :, i, j], dim=0)
    if pointwise:
        fd = fd - fd.mean(dim=(3, 4), keepdim=True) + fd.mean()
    return -((fd - shift) * cd.clamp(min=0)).mean()


def test_correlation_is_cosine_similarity():
    a, b = rand(2, 5, 3, 4), rand(2, 5, 2, 3, seed=1)
    corr = correlation(a, b)
    assert corr.shape == (2, 3, 4, 2, 3)
    expected = F.cosine_similarity(a[1, :, 2, 3], b[1, :, 1, 0], dim=0)
    torch.testing.assert_close(corr[1, 2, 3, 1, 0], expected)


@pytest.mark.parametrize("pointwise", [False, True])
def test_correspondence_loss_matches_direct_formula(pointwise):
    f1, f2, c1, c2 = rand(2, 6, 3, 3), rand(2, 6, 2, 4, seed=1), rand(2, 4, 3, 3, seed=2), rand(2, 4, 2, 4, seed=3)
    ours = correspondence_loss(f1, f2, c1, c2, shift=0.2, pointwise=pointwise)
    torch.testing.assert_close(ours, direct_loss(f1, f2, c1, c2, 0.2, pointwise))


def test_stego_loss_weights_the_three_terms():
    cfg = StegoConfig(feature_samples=0, pos_intra_weight=0.3, pos_inter_weight=0.5, neg_inter_weight=0.7)
    head = SegmentationHead(6, 4).double()
    f, fk, fr = rand(2, 6, 3, 3), rand(2, 6, 3, 3, seed=1), rand(2, 6, 3, 3, seed=2)
    total, parts = stego_loss(f, fk, fr, head, cfg, torch.Generator())
    with torch.no_grad():
        c, ck, cr = head(f), head(fk), head(fr)
    expected = {
        "pos_intra": direct_loss(f, f, c, c, cfg.pos_intra_shift, True),
        "pos_inter": direct_loss(f, fk, c, ck, cfg.pos_inter_shift, True),
        "neg_inter": direct_loss(f, fr, c, cr, cfg.neg_inter_shift, True),
    }
    for name, value in expected.items():
        assert parts[name] == pytest.approx(float(value), rel=1e-9)
    assert float(total.detach()) == pytest.approx(0.3 * parts["pos_intra"] + 0.5 * parts["pos_inter"] + 0.7 * parts["neg_inter"], rel=1e-9)


def test_knn_partners_exclude_self():
    cls = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    partners = knn_partners(cls, k=1, block_elements=3 * 4)  # blocks of 3 rows
    assert partners.flatten().tolist() == [1, 0, 3, 2]
    assert knn_partners(cls[:1], k=5).tolist() == [[0]]


@pytest.mark.parametrize("method", ["stego", "kmeans"])
def test_segment_separates_two_feature_kinds(method):
    # left half of every image has feature a, right half feature b: two classes, split at the middle
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 1.0, 1.0
    noise = 0.05 * torch.randn(6, 4, 4, 8, generator=torch.Generator().manual_seed(0))
    patches = torch.cat([a.expand(6, 4, 2, 8), b.expand(6, 4, 2, 8)], dim=2) + noise
    cls = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    from sgdm.annotation.config import KMeansConfig

    cfg = StegoConfig(method=method, dim=4, epochs=2, batch_size=3, knn=2, feature_samples=0, mask_size=0)
    masks = segment(patches, cls, 2, cfg, KMeansConfig(), torch.Generator().manual_seed(0))
    assert masks.shape == (6, 4, 4) and masks.dtype == torch.uint8
    left, right = masks[:, :, :2], masks[:, :, 2:]
    assert left.unique().numel() == 1 and right.unique().numel() == 1 and left[0, 0, 0] != right[0, 0, 0]


def _diagonal_field(grid: int, offset: float = 0.125) -> torch.Tensor:
    """Patch features ``[1, grid, grid, 3]`` of a code field linear in ``d = x - y - offset`` (patch
    units, patch centres at k + 0.5): channels (d, -d, 1), so the class boundary is the diagonal d = 0."""
    centres = torch.arange(grid, dtype=torch.float64) + 0.5
    d = centres[None, :] - centres[:, None] - offset  # [y, x]
    return torch.stack([d, -d, torch.ones_like(d)], dim=-1)[None].float()


def _diagonal_segmenter(mask_size: int):
    from sgdm.annotation.stego import Segmenter

    centroids = F.normalize(torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]), dim=1)  # class 0: d > 0
    return Segmenter(centroids, head=None, mask_size=mask_size)


def test_finer_masks_follow_a_diagonal_boundary_the_patch_grid_makes_blocky():
    grid, size = 4, 16
    patches = _diagonal_field(grid)
    coarse = _diagonal_segmenter(0).assign(patches)[0]
    fine = _diagonal_segmenter(size).assign(patches)[0]
    assert coarse.shape == (grid, grid) and fine.shape == (size, size) and fine.dtype == torch.uint8
    # oracle (float64): bilinear interpolation of a linear field is the field itself, except that
    # with half-pixel centres a cell within half a patch of the border reads the border patch
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) * grid / size
    clamped = centres.clamp(0.5, grid - 0.5)
    expected = (clamped[None, :] - clamped[:, None] - 0.125 < 0).to(torch.uint8)
    assert torch.equal(fine, expected)
    truth = (centres[None, :] - centres[:, None] - 0.125 < 0).to(torch.uint8)
    blocky = coarse.repeat_interleave(size // grid, 0).repeat_interleave(size // grid, 1)
    assert (fine != truth).sum() < (blocky != truth).sum()  # 2 cells wrong (corners) against 24
    blocks = fine.reshape(grid, size // grid, grid, size // grid).permute(0, 2, 1, 3).flatten(2)
    assert (blocks.amin(-1) != blocks.amax(-1)).any()  # the boundary runs through patches


def test_mask_size_no_finer_than_the_patch_grid_keeps_it_and_save_keeps_the_size(tmp_path):
    from sgdm.annotation.stego import Segmenter
    from sgdm.annotation.store import save_tensors_atomic
    from sgdm.config.core import ConfigError, from_dict

    patches = _diagonal_field(4)
    for size in (0, 3):
        assert torch.equal(_diagonal_segmenter(size).assign(patches), _diagonal_segmenter(4).assign(patches))
    with pytest.raises(ConfigError, match="annotation.stego.mask_size: must be in"):
        from_dict(StegoConfig, {"mask_size": -1}, "annotation.stego")
    with pytest.raises(ValueError, match="mask_size must be >= 0"):
        _diagonal_segmenter(-1)
    path = _diagonal_segmenter(16).save(tmp_path / "seg.safetensors")
    assert Segmenter.load(path).mask_size == 16
    save_tensors_atomic(tmp_path / "old.safetensors", {"centroids": torch.eye(2)})  # as sgdm wrote it before
    assert Segmenter.load(tmp_path / "old.safetensors").mask_size == 0  # it drew patch-grid maps


@pytest.mark.parametrize("method", ["stego", "kmeans"])
def test_segment_at_mask_size_upsamples_the_codes(method):
    from sgdm.annotation.config import KMeansConfig
    from sgdm.annotation.stego import fit_segmenter

    patches = torch.randn(5, 3, 3, 6, generator=torch.Generator().manual_seed(0))
    cls = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    cfg = StegoConfig(method=method, dim=4, epochs=1, batch_size=2, knn=2, feature_samples=0, mask_size=7)
    segmenter = fit_segmenter(patches, cls, 3, cfg, KMeansConfig(), torch.Generator().manual_seed(0))
    masks = segment(patches, cls, 3, cfg, KMeansConfig(), torch.Generator(), segmenter=segmenter)
    assert segmenter.mask_size == 7 and masks.shape == (5, 7, 7)
    # reference: every image alone, codes upsampled by F.interpolate, nearest centroid by cdist
    encode = segmenter.encoder()
    for i in range(5):
        codes = F.interpolate(encode.raw(patches[i : i + 1]), size=(7, 7), mode="bilinear", align_corners=False)
        codes = F.normalize(codes, dim=1)[0].permute(1, 2, 0).reshape(-1, encode.dim)
        expected = torch.cdist(codes.double(), segmenter.centroids.double()).argmin(1).reshape(7, 7)
        assert (masks[i].long() == expected).float().mean() > 0.97  # float32 ties aside
    # small steps: chunk_elements bounds the upsampled codes held at once, same maps
    assert torch.equal(segmenter.assign(patches, chunk_elements=7 * 7 * 6), masks)
