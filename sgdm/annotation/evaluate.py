"""Scores of annotation records against packed ground truth (``--evaluate``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sgdm.annotation.ground_truth import unpack_boxes
from sgdm.annotation.metrics import cluster_scores, confusion, corloc, hungarian_miou

__all__ = ["evaluate_records"]

# ground-truth pixels per block of the mask scores: the masks are compared a block of images at a time
# (as int64 at ground-truth size, the whole of COCO's 118k images at 256 px would take ~60 GB)
_BLOCK_PIXELS = 1 << 24


def evaluate_records(granularity: str, records: dict, gt: dict, num_classes: int, image_hw: Sequence[int]) -> dict[str, float]:
    """NMI/ARI/purity (clusters vs ``gt_label``), CorLoc (boxes), mIoU and pixel accuracy (masks);
    only the scores whose ground truth ``gt`` holds."""
    metrics: dict[str, float] = {}
    if "cluster" in records and "gt_label" in gt and bool((gt["gt_label"] >= 0).any()):
        metrics.update(cluster_scores(records["cluster"], gt["gt_label"]))
    if granularity == "box" and "gt_boxes" in gt:
        h, w = image_hw
        pixels = records["box"].double() * torch.tensor([w, h, w, h], dtype=torch.float64)
        metrics["corloc"] = corloc(pixels, unpack_boxes(gt))
    if granularity == "mask" and "gt_mask" in gt:
        metrics.update(_mask_scores(records["mask"], gt["gt_mask"], num_classes))
    return metrics


def _mask_scores(masks: torch.Tensor, true: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Hungarian mIoU and pixel accuracy of class maps ``masks [N, h, w]`` against ``true [N, H, W]``
    (255 = ignore): each map is brought to the ground truth's size as training reads it
    (:func:`~sgdm.models.conditioning.resize_class_map`: a coarser map's cells are read at the pixels'
    centres), and the confusion matrix is summed a block of images at a time."""
    from sgdm.models.conditioning import resize_class_map

    step = max(1, _BLOCK_PIXELS // max(1, true[0].numel()))
    num_true = 1
    for s in range(0, len(true), step):
        valid = true[s : s + step][true[s : s + step] != 255]
        if valid.numel():
            num_true = max(num_true, int(valid.max()) + 1)
    num_pred = max(num_classes, int(masks.max()) + 1 if masks.numel() else 0)
    table = np.zeros((num_pred, num_true), dtype=np.int64)
    for s in range(0, len(true), step):
        t = true[s : s + step].long()
        p = resize_class_map(masks[s : s + step].long(), t.shape[-2:], num_pred)
        table += confusion(p, t, num_pred, num_true)
    return hungarian_miou(table)
