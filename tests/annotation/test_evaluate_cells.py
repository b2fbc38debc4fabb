"""Mask scores of --evaluate: cells read at their centres, and a bounded number of images at a time."""
import torch

from sgdm.annotation import evaluate as evaluate_module
from sgdm.annotation.evaluate import evaluate_records


def test_masks_coarser_than_the_ground_truth_are_read_at_cell_centres():
    # 14 mask cells over 32 ground-truth pixels (a ViT-B/16's grid on a 32-pixel image): the prediction
    # is exactly the ground truth drawn on the cells, so it must score 1.0; reading each pixel's cell
    # at its corner (plain nearest) shifts every boundary by up to a pixel
    cells = torch.arange(14) % 2
    pixel_cell = ((torch.arange(32) + 0.5) * 14 / 32).long()  # the cell under each pixel's centre
    true = cells[pixel_cell].expand(32, 32)[None].to(torch.uint8)
    pred = cells.expand(14, 14)[None].to(torch.uint8)
    scores = evaluate_records("mask", {"mask": pred}, {"gt_mask": true}, 2, [32, 32])
    assert scores["miou"] == 1.0 and scores["pixel_accuracy"] == 1.0


def test_mask_scores_are_accumulated_a_block_of_images_at_a_time(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    n = 40
    true = torch.randint(0, 5, (n, 16, 16), generator=generator, dtype=torch.uint8)
    true[:, :2] = 255
    pred = torch.randint(0, 6, (n, 8, 8), generator=generator, dtype=torch.uint8)
    whole = evaluate_records("mask", {"mask": pred}, {"gt_mask": true}, 6, [16, 16])
    seen = []
    real = evaluate_module.confusion

    def spy(p, t, *args, **kwargs):
        seen.append(p.shape[0])
        return real(p, t, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "confusion", spy)
    monkeypatch.setattr(evaluate_module, "_BLOCK_PIXELS", 16 * 16 * 7, raising=False)  # 7 images of 16 x 16 a block
    blocked = evaluate_records("mask", {"mask": pred}, {"gt_mask": true}, 6, [16, 16])
    assert max(seen) <= 7 and sum(seen) == n  # never the whole set at ground-truth size at once
    assert blocked == whole
