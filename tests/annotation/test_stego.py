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

    cfg = StegoConfig(method=method, dim=4, epochs=2, batch_size=3, knn=2, feature_samples=0)
    masks = segment(patches, cls, 2, cfg, KMeansConfig(), torch.Generator().manual_seed(0))
    assert masks.shape == (6, 4, 4) and masks.dtype == torch.uint8
    left, right = masks[:, :, :2], masks[:, :, 2:]
    assert left.unique().numel() == 1 and right.unique().numel() == 1 and left[0, 0, 0] != right[0, 0, 0]
