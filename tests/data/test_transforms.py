"""Centre crop + resize + flip move boxes and masks exactly with the image."""
import numpy as np
import pytest
import torch
from PIL import Image

from sgdm.data.transforms import centre_crop, flip_coin, transform_boxes, transform_image, transform_mask


def _reference_boxes(boxes, width, height, size, flipped):
    """Float64 reference written independently of the implementation."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    out = []
    for x1, y1, x2, y2 in boxes:
        s = size / side
        b = [min(max((x1 - left) * s, 0), size), min(max((y1 - top) * s, 0), size),
             min(max((x2 - left) * s, 0), size), min(max((y2 - top) * s, 0), size)]
        if b[2] <= b[0] or b[3] <= b[1]:
            continue
        if flipped:
            b = [size - b[2], b[1], size - b[0], b[3]]
        out.append(b)
    return np.array(out, dtype=np.float64).reshape(-1, 4)


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("width,height", [(60, 40), (40, 60), (48, 48)])
def test_boxes_match_float64_reference(width, height, flipped):
    boxes = np.array([[0, 0, 10, 10], [5.5, 3, 30, 39], [width - 4, height - 4, width, height], [20, 10, 21, 11]])
    crop = centre_crop(width, height, 32)
    out, keep = transform_boxes(boxes, crop, flipped)
    ref = _reference_boxes(boxes, width, height, 32, flipped)
    assert out.dtype == torch.float32 and keep.sum() == len(ref)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-4)


def test_boxes_outside_the_crop_are_dropped():
    crop = centre_crop(100, 50, 50)  # keeps columns 25..75
    out, keep = transform_boxes(np.array([[0, 0, 20, 20], [30, 10, 40, 20]]), crop, False)
    assert keep.tolist() == [False, True]
    assert out.tolist() == [[5.0, 10.0, 15.0, 20.0]]


@pytest.mark.parametrize("flipped", [False, True])
def test_image_mask_and_box_stay_aligned(flipped):
    width, height, size = 90, 60, 30
    image = np.zeros((height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    image[12:30, 21:45] = 255  # a white rectangle...
    mask[12:30, 21:45] = 3  # ...labelled 3...
    box = np.array([[21, 12, 45, 30]])  # ...with its box
    crop = centre_crop(width, height, size)
    img = transform_image(Image.fromarray(image), crop, flipped)
    msk = transform_mask(mask, crop, flipped)
    boxes, _ = transform_boxes(box, crop, flipped)
    x1, y1, x2, y2 = boxes[0].round().int().tolist()
    assert set(torch.unique(msk).tolist()) == {0, 3}
    inside = msk[y1:y2, x1:x2]
    assert (inside == 3).all() and (msk == 3).sum() == inside.numel()  # box is tight on the mask
    assert img.shape == (3, size, size) and img.min() >= -1 and img.max() <= 1
    assert (img[0][msk == 3] > 0.5).all()  # edges blend: antialiased bicubic
    assert (img[0][msk == 0] < -0.9).sum() > 0.9 * (msk == 0).sum()


def test_mask_keeps_ignore_and_never_blends():
    mask = np.tile(np.array([0, 5, 255], dtype=np.uint8), (30, 10))[:, :30]
    out = transform_mask(mask, centre_crop(30, 30, 17), False)
    assert out.dtype == torch.int64 and set(torch.unique(out).tolist()) <= {0, 5, 255}


def test_image_values_map_0_255_to_minus1_1():
    image = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8).repeat(8, 0).repeat(8, 1))
    out = transform_image(image, centre_crop(8, 8, 8), False)
    assert torch.allclose(out[:, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))


def test_flip_coin_is_deterministic_and_fair():
    coins = [flip_coin(3, 1, i) for i in range(2000)]
    assert coins == [flip_coin(3, 1, i) for i in range(2000)]
    assert 900 < sum(coins) < 1100
    assert coins != [flip_coin(3, 2, i) for i in range(2000)]  # a new epoch, new flips
    assert coins != [flip_coin(4, 1, i) for i in range(2000)]
