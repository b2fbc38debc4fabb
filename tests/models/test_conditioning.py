import pytest
import torch

from sgdm.models.conditioning import (box_mask, class_map_one_hot, condition_dims, condition_from_annotations,
                                      drop_guidance, multi_hot, null_condition, one_hot)

from tests.models.helpers import K, guidance


def test_condition_dims_per_kind():
    assert [condition_dims(guidance(k)) for k in ("none", "label", "box", "mask")] == [(0, 0), (K, 0), (K, 1), (K, K)]


def test_one_hot_and_bad_ids():
    torch.testing.assert_close(one_hot([2, 0], 3), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    with pytest.raises(ValueError, match=r"^cluster: id 3 is outside \[0, 3\)"):
        one_hot([3], 3)
    with pytest.raises(ValueError, match="^cluster: id -1"):
        one_hot(torch.tensor([-1]), 3)
    with pytest.raises(ValueError, match="^cluster: expected integer"):
        one_hot(torch.tensor([1.0]), 3)


def test_box_mask_pixels_and_flip():
    # Box x in [0.25, 0.5], y in [0, 0.75] on a 4x8 (H x W) grid: columns 2..3, rows 0..2.
    mask = box_mask(torch.tensor([[0.25, 0.0, 0.5, 0.75]]), 4, 8)
    expected = torch.zeros(1, 1, 4, 8)
    expected[0, 0, 0:3, 2:4] = 1
    torch.testing.assert_close(mask, expected)
    flipped = box_mask(torch.tensor([[0.25, 0.0, 0.5, 0.75]]), 4, 8, flipped=[True])
    torch.testing.assert_close(flipped, expected.flip(-1))
    # A box covering part of a cell turns the whole cell on; a zero-size box still marks one pixel.
    assert box_mask(torch.tensor([[0.3, 0.3, 0.31, 0.31]]), 4, 4).sum() == 1
    assert box_mask(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), 4, 4)[0, 0, 3, 3] == 1


def test_box_mask_union_of_several_boxes():
    mask = box_mask([torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])], 2, 2)
    torch.testing.assert_close(mask[0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("box", [[0.5, 0.0, 0.25, 1.0], [-0.1, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.5],
                                 [float("nan"), 0.0, 0.5, 0.5], [0.0, 0.0, float("inf"), 1.0]])
def test_box_mask_rejects_bad_boxes(box):
    with pytest.raises(ValueError, match=r"^boxes\[0\]: expected normalized xyxy"):
        box_mask(torch.tensor([box]), 4, 4)


@pytest.mark.parametrize("shape,size,k", [((256, 256), (32, 32), 27), ((37, 53), (8, 11), 5), ((64, 48), (64, 5), 3),
                                           ((10, 10), (3, 7), 4), ((5, 5), (1, 1), 2), ((7, 9), (7, 2), 3)])
def test_shrinking_a_class_map_takes_each_cell_majority(shape, size, k):
    # the definition: argmax over classes of adaptive_avg_pool2d of the one-hot (lowest id on ties; ignored
    # pixels do not vote; a cell of ignored pixels only stays ignored), on divisible and overlapping cells
    import torch.nn.functional as F

    from sgdm.models.conditioning import IGNORE_INDEX, resize_class_map

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, k, (3, *shape), generator=gen)
    ids[:, : shape[0] // 2] = torch.randint(0, k, (3, 1, shape[1]), generator=gen)  # blocks: majorities and ties
    ids[torch.rand(3, *shape, generator=gen) < 0.3] = IGNORE_INDEX
    ids[1, : shape[0] // 2 + 1] = IGNORE_INDEX  # whole cells of ignored pixels (where cells are small)
    ids[2] = IGNORE_INDEX
    share = F.adaptive_avg_pool2d(class_map_one_hot(ids, k), size)
    want = torch.where(share.sum(1) > 0, share.argmax(1), IGNORE_INDEX)
    got = resize_class_map(ids, size, k)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert bool((got[2] == IGNORE_INDEX).all()) and bool((got[0] != IGNORE_INDEX).any())


def test_class_map_one_hot_ignore_flip_resize_and_multi_hot():
    cmap = torch.tensor([[[0, 1], [255, 2]]], dtype=torch.uint8)
    hot = class_map_one_hot(cmap, 3)
    assert hot.shape == (1, 3, 2, 2)
    torch.testing.assert_close(hot[0].argmax(0)[0], torch.tensor([0, 1]))
    assert hot[0, :, 1, 0].sum() == 0  # ignore label -> all-zero channels
    torch.testing.assert_close(class_map_one_hot(cmap, 3, flipped=[True]), hot.flip(-1))
    big = class_map_one_hot(cmap, 3, size=(4, 4))
    torch.testing.assert_close(big, hot.repeat_interleave(2, 2).repeat_interleave(2, 3))
    torch.testing.assert_close(multi_hot(hot), torch.tensor([[1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="^mask: class id 3 is outside"):
        class_map_one_hot(torch.tensor([[3]]), 3)
    with pytest.raises(ValueError, match="^mask: expected an integer class map"):
        class_map_one_hot(torch.zeros(1, 2, 2), 3)


def _records():
    mask_a = torch.zeros(16, 16, dtype=torch.uint8)
    mask_a[:, 8:] = 2
    mask_a[0, 0] = 4  # a one-pixel region: must survive in the multi-hot vector even when resized away
    mask_b = torch.full((8, 8), 255, dtype=torch.uint8)
    mask_b[:4] = 1
    return [{"cluster": 1, "box": [0.0, 0.0, 0.5, 0.5], "mask": mask_a},
            {"cluster": 4, "box": [0.5, 0.5, 1.0, 1.0], "mask": mask_b}]


def test_condition_from_annotations_every_kind():
    records, flipped = _records(), torch.tensor([True, False])
    assert condition_from_annotations(guidance("none"), records, (4, 4)) == (None, None)
    cond, cmap = condition_from_annotations(guidance("label"), records, (4, 4), flipped)
    torch.testing.assert_close(cond, one_hot([1, 4], K))
    assert cmap is None
    cond, cmap = condition_from_annotations(guidance("box"), records, (4, 4), flipped)
    assert cmap.shape == (2, 1, 4, 4)
    torch.testing.assert_close(cmap[0, 0, :2, 2:], torch.ones(2, 2))  # mirrored into the top-right
    assert cmap[0].sum() == 4 and cmap[1, 0, 2:, 2:].sum() == 4
    cond, cmap = condition_from_annotations(guidance("mask"), records, (4, 4), flipped)
    assert cmap.shape == (2, K, 4, 4)
    torch.testing.assert_close(cond, torch.tensor([[1.0, 0, 1, 0, 1], [0, 1, 0, 0, 0]]))
    torch.testing.assert_close(cmap[0, 2, :, :2], torch.ones(4, 2))  # class 2 (right half) mirrored left
    assert cmap[1, :, 2:].sum() == 0  # ignored rows
    with pytest.raises(ValueError, match="no 'box' field"):
        condition_from_annotations(guidance("box"), [{"cluster": 0}], (4, 4))


def test_drop_guidance_drops_both_together_and_is_reproducible():
    cond, cmap = torch.ones(64, K), torch.ones(64, 1, 2, 2)
    a = drop_guidance(cond, cmap, 0.5, torch.Generator().manual_seed(3))
    b = drop_guidance(cond, cmap, 0.5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a[0], b[0])
    kept_cond, kept_map = a[0].amax(1), a[1].amax((1, 2, 3))
    torch.testing.assert_close(kept_cond, kept_map)
    assert 0 < kept_cond.sum() < 64
    assert drop_guidance(cond, cmap, 0.0)[0].sum() == cond.sum()
    assert drop_guidance(cond, None, 1.0)[0].sum() == 0
    assert drop_guidance(None, None, 0.5) == (None, None)
    with pytest.raises(ValueError, match="^p: "):
        drop_guidance(cond, cmap, 1.5)
    assert null_condition(cond, None)[0].sum() == 0 and null_condition(cond, None)[1] is None


def test_mask_condition_multi_hot_is_the_one_hot_max_pool():
    """The training path's histogram multi-hot (``_present_classes``) gives exactly what the one-hot does."""
    from sgdm.models.conditioning import IGNORE_INDEX, _mask_condition

    g = torch.Generator().manual_seed(0)
    maps = [torch.randint(0, 6, (h, w), generator=g, dtype=torch.uint8) for h, w in ((9, 13), (16, 16), (1, 1))]
    maps[0][torch.rand(9, 13, generator=g) < 0.4] = IGNORE_INDEX
    maps[2].fill_(IGNORE_INDEX)
    cond, _ = _mask_condition(maps, 7, (8, 8), torch.tensor([True, False, True]))
    expected = torch.cat([multi_hot(class_map_one_hot(m[None], 7)) for m in maps])
    assert cond.dtype == torch.float32 and torch.equal(cond, expected) and not torch.signbit(cond).any()
    with pytest.raises(ValueError, match="class id 9 is outside"):
        _mask_condition([torch.full((2, 2), 9)], 7, (8, 8), None)


def _box_mask_per_box(boxes, height, width, flipped=None):
    """The per-sample, per-box loop box_mask replaced: the oracle for the vectorised one."""
    items = [b[None] for b in boxes] if isinstance(boxes, torch.Tensor) else [
        torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
    flips = [False] * len(items) if flipped is None else [bool(f) for f in torch.as_tensor(flipped).reshape(-1)]
    out = torch.zeros(len(items), 1, height, width)
    xs, ys = torch.arange(width, dtype=torch.float32), torch.arange(height, dtype=torch.float32)

    def covered(cells, lo, hi):
        return ((cells + 1 > lo) & (cells < hi)) | (cells == torch.clamp(torch.floor(lo), max=cells.numel() - 1))

    for i, (b, flip) in enumerate(zip(items, flips)):
        b = b.float()
        if flip:
            b = torch.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], dim=1)
        for x0, y0, x1, y1 in b:
            cell = covered(ys, y0 * height, y1 * height)[:, None] & covered(xs, x0 * width, x1 * width)[None, :]
            out[i, 0] = torch.maximum(out[i, 0], cell.float())
    return out


def _random_boxes(g, n, height, width):
    """Normalized xyxy with the edge cases mixed in: on pixel edges (k / W), touching 0 and 1,
    zero width and/or height, and the whole image."""
    a, b = torch.rand(n, 2, generator=g), torch.rand(n, 2, generator=g)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    kind = torch.randint(0, 6, (n,), generator=g)
    grid = torch.tensor([width, height], dtype=torch.float32)
    snapped_lo, snapped_hi = (lo * grid).floor() / grid, (hi * grid).ceil() / grid
    lo = torch.where((kind == 1)[:, None], snapped_lo, lo)
    hi = torch.where((kind == 1)[:, None], snapped_hi, hi)
    hi = torch.where((kind == 2)[:, None], lo, hi)  # zero area
    hi[kind == 3, 0] = lo[kind == 3, 0]  # zero width only
    lo = torch.where((kind == 4)[:, None], torch.zeros(2), lo)  # touching the top-left border
    hi = torch.where((kind == 4)[:, None], torch.ones(2), hi)  # and the bottom-right one
    lo = torch.where((kind == 5)[:, None], torch.ones(2), lo)  # a point at (1, 1)
    hi = torch.where((kind == 5)[:, None], torch.ones(2), hi)
    return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], dim=1)


@pytest.mark.parametrize("height, width", [(4, 4), (8, 8), (5, 7), (32, 32), (1, 3)])
def test_box_mask_is_the_per_box_loop_on_random_and_edge_boxes(height, width):
    g = torch.Generator().manual_seed(height * 100 + width)
    boxes = _random_boxes(g, 64, height, width)
    flipped = torch.rand(64, generator=g) < 0.5
    for flags in (None, flipped):
        expected = _box_mask_per_box(boxes, height, width, flags)
        assert torch.equal(box_mask(boxes, height, width, flipped=flags), expected)
        assert torch.equal(box_mask(boxes.double(), height, width, flipped=flags), expected)
    # a union of 0 .. 3 boxes per sample
    counts = torch.randint(0, 4, (16,), generator=g).tolist()
    lists = list(_random_boxes(g, sum(counts), height, width).split(counts))
    for flags in (None, flipped[:16].tolist()):
        assert torch.equal(box_mask(lists, height, width, flipped=flags),
                           _box_mask_per_box(lists, height, width, flags))
    one_each = [b.tolist() for b in boxes[:5]]  # plain lists, one box per sample
    assert torch.equal(box_mask(one_each, height, width), _box_mask_per_box(one_each, height, width))


def test_box_mask_of_no_samples_and_bad_shapes():
    assert box_mask(torch.zeros(0, 4), 4, 6).shape == (0, 1, 4, 6)
    assert box_mask([], 4, 6).shape == (0, 1, 4, 6)
    assert box_mask([torch.zeros(0, 4)], 4, 6).sum() == 0
    with pytest.raises(ValueError, match=r"^boxes: expected \[B, 4\] normalized xyxy, got shape \(2, 5\)"):
        box_mask(torch.zeros(2, 5), 4, 4)
    with pytest.raises(ValueError, match=r"^flipped: expected 2 flags, got 3"):
        box_mask(torch.zeros(2, 4), 4, 4, flipped=[True, False, True])
    # the first sample with a bad box is named, with all its boxes
    with pytest.raises(ValueError, match=r"^boxes\[1\]: .* got \[\[0\.0, 0\.0, 0\.5, 0\.5\], \[0\.5, 0\.0, 0\.25"):
        box_mask([[[0, 0, 1, 1]], [[0, 0, 0.5, 0.5], [0.5, 0, 0.25, 1]], [[2, 0, 1, 1]]], 4, 4)


def test_resize_class_map_votes_by_area_when_shrinking_and_takes_centres_when_growing():
    from sgdm.models.conditioning import IGNORE_INDEX, class_map_one_hot, resize_class_map

    ig = IGNORE_INDEX
    ids = torch.tensor([[[0, 1, 2, 2],
                         [1, 1, 2, 3],
                         [ig, ig, 0, 1],
                         [ig, 2, 1, 0]]])
    # top-left: 1 covers 3 of 4; top-right: 2 covers 3; bottom-left: one valid pixel (2), the ignored
    # ones do not vote; bottom-right: a tie of 0 and 1 -> the lower id
    assert resize_class_map(ids, (2, 2), 4).tolist() == [[[1, 2], [2, 0]]]
    assert resize_class_map(torch.full((1, 4, 4), ig), (2, 2), 4).tolist() == [[[ig, ig], [ig, ig]]]
    # plain nearest would have taken each block's top-left pixel: 0, 2, ig, 0
    hot = class_map_one_hot(ids, 4, size=(2, 2))
    assert hot.argmax(1).tolist() == [[[1, 2], [2, 0]]] and hot.sum(1).eq(1).all()
    small = torch.tensor([[[0, 1], [2, ig]]])
    assert torch.equal(resize_class_map(small, (4, 4), 3), small.repeat_interleave(2, 1).repeat_interleave(2, 2))
    # 3 -> 2 (not a whole factor): every output cell averages the input area it covers
    three = torch.tensor([[[0, 0, 1], [0, 2, 1], [2, 2, 1]]])
    assert resize_class_map(three, (2, 2), 3).tolist() == [[[0, 1], [2, 1]]]
    assert resize_class_map(ids, (4, 4), 4) is ids
