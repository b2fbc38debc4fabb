"""LOST's patch affinities (the O(P^2 D) part) are computed for a batch at once on the keys' device:
per image on the CPU they took ~2 ms, several times a GPU's ViT forward pass, for every image of the
dataset (ImageNet's 1.28M: ~45 CPU-minutes with the GPU idle)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sgdm.annotation import lost as lost_module
from sgdm.annotation.lost import lost, lost_batch

_PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.matmul.default}


class _Products(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in _PRODUCTS
        return func(*args, **(kwargs or {}))


def _keys(b=5, side=6, dim=8):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(b, side, side, dim, generator=g)
    keys[:, 1:3, 2:5] += 3 * torch.randn(dim, generator=g)  # an object
    return keys


def test_a_batch_takes_one_product_and_gives_the_boxes_of_each_image():
    keys = _keys()
    for center in (False, True):
        with _Products() as products:
            boxes = lost_batch(keys, k_patches=10, center=center)
        assert products.count == 1
        assert torch.equal(boxes, torch.stack([lost(k, 10, center)[0] for k in keys]))


def test_large_patch_grids_are_split_into_bounded_blocks(monkeypatch):
    keys = _keys(b=5)
    monkeypatch.setattr(lost_module, "_AFFINITY_BLOCK_ELEMENTS", 2 * 36 * 36)  # two images' affinities
    with _Products() as products:
        boxes = lost_batch(keys, k_patches=10)
    assert products.count == 3 and torch.equal(boxes, torch.stack([lost(k, 10)[0] for k in keys]))
