"""Scores of annotation records against packed ground truth (``--evaluate``)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from sgdm.annotation.ground_truth import unpack_boxes
from sgdm.annotation.metrics import cluster_scores, confusion, corloc, hungarian_miou

__all__ = ["evaluate_records"]


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
        true = gt["gt_mask"].long()
        pred = F.interpolate(records["mask"][:, None].float(), size=true.shape[-2:], mode="nearest")[:, 0].long()
        valid = true[true != 255]
        num_true = int(valid.max()) + 1 if valid.numel() else 1
        metrics.update(hungarian_miou(confusion(pred, true, max(num_classes, int(pred.max()) + 1), num_true)))
    return metrics
