"""The range checks of class maps (write_store's, the ground truth's) hold a block of masks at a time:
a bool per pixel of a 256-pixel ground-truth store of COCO's 118k images is 7.7 GB, and the old
checks made three such temporaries beside the masks."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sgdm.annotation import store as store_module
from sgdm.annotation.ground_truth import ground_truth_records
from sgdm.annotation.store import write_store

IDS = [f"img-{i:03d}" for i in range(10)]


def _masks(n=10, side=32, k=5):
    masks = torch.randint(k, (n, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    masks[1, :2] = 255
    return masks


class _BoolOutputs(TorchDispatchMode):
    """The element count of every bool tensor an op produces (comparison masks and their combinations)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.bool:
                self.numels.append(t.numel())
        return out


def test_writing_a_mask_store_checks_its_values_a_block_of_masks_at_a_time(tmp_path, monkeypatch):
    masks = _masks()
    monkeypatch.setattr(store_module, "_MULTI_HOT_BLOCK_PIXELS", 3 * 1024)
    with _BoolOutputs() as seen:
        write_store(tmp_path, IDS, {"mask": masks}, granularity="mask", num_classes=5)
    assert max(seen.numels) <= 3 * 1024
    bad = masks.clone()
    bad[7, 3, 3] = 6
    with pytest.raises(ValueError, match="mask values must be < K=5 or 255, got 6"):
        write_store(tmp_path / "bad", IDS, {"mask": bad}, granularity="mask", num_classes=5)


def test_ground_truth_masks_are_checked_a_block_at_a_time(monkeypatch):
    masks = _masks()
    monkeypatch.setattr(store_module, "_MULTI_HOT_BLOCK_PIXELS", 3 * 1024)
    with _BoolOutputs() as seen:
        records, _ = ground_truth_records({"gt_mask": masks}, "mask", 5, [8, 8], IDS)
    assert max(seen.numels) <= 3 * 1024 and records["mask"] is masks
    with pytest.raises(Exception, match="4 is too small: the ground truth has mask value 4"):
        ground_truth_records({"gt_mask": masks}, "mask", 4, [8, 8], IDS)
