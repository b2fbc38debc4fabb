"""How good self-annotations are, where ground truth exists (paper Sec. 4).

* clusters vs labels: NMI (arithmetic-mean normalisation, as scikit-learn's
  default), ARI (Hubert & Arabie), purity (each cluster votes its majority class);
* boxes: CorLoc, the fraction of images whose predicted box has IoU >= 0.5
  with at least one ground-truth box;
* masks: mIoU and pixel accuracy after Hungarian matching of predicted
  classes to ground-truth classes on the pixel confusion matrix (unmatched
  predicted classes count as wrong); pixels labelled 255 are ignored.

All counts are integers and the scores are computed in float64.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["contingency", "nmi", "ari", "purity", "box_iou", "corloc", "confusion", "matched_miou", "hungarian_miou", "cluster_scores"]


def _labels(x, name: str) -> np.ndarray:
    arr = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of labels, got shape {arr.shape}")
    return arr.astype(np.int64)


def contingency(pred, true) -> np.ndarray:
    """Counts ``[n_pred_classes, n_true_classes]`` over the distinct values of each labelling."""
    p, t = _labels(pred, "pred"), _labels(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred and true must have the same length, got {p.shape[0]} and {t.shape[0]}")
    if p.size == 0:
        raise ValueError("no labels to compare (empty input)")
    _, pi = np.unique(p, return_inverse=True)
    _, ti = np.unique(t, return_inverse=True)
    table = np.zeros((pi.max() + 1, ti.max() + 1), dtype=np.int64)
    np.add.at(table, (pi, ti), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(pred, true) -> float:
    """``I(P; T) / ((H(P) + H(T)) / 2)``; 1.0 when both labellings are a single class."""
    table = contingency(pred, true).astype(np.float64)
    n = table.sum()
    hp, ht = _entropy(table.sum(1)), _entropy(table.sum(0))
    if hp == 0 and ht == 0:
        return 1.0
    nz = table > 0
    outer = np.outer(table.sum(1), table.sum(0))
    mi = float((table[nz] / n * np.log(table[nz] * n / outer[nz])).sum())
    return mi / ((hp + ht) / 2) if hp + ht > 0 else 0.0


def ari(pred, true) -> float:
    """Adjusted Rand index: ``(sum C(n_ij,2) - E) / (max - E)``, 1.0 for identical partitions."""
    table = contingency(pred, true).astype(np.float64)

    def pairs(x):
        return float((x * (x - 1) / 2).sum())

    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    total = pairs(np.array([table.sum()]))
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)


def purity(pred, true) -> float:
    """Fraction of items whose cluster's majority class is their class."""
    table = contingency(pred, true)
    return float(table.max(1).sum() / table.sum())


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU ``[n, m]`` of xyxy boxes ``a [n, 4]`` and ``b [m, 4]`` (float64)."""
    a, b = a.double().reshape(-1, 4), b.double().reshape(-1, 4)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(union))


def corloc(pred_boxes: torch.Tensor, gt_boxes: Sequence[torch.Tensor], threshold: float = 0.5) -> float:
    """Fraction of images whose box ``pred_boxes[i]`` hits some box of ``gt_boxes[i]`` (same coordinates).

    Images without ground-truth boxes count as misses (they are part of the set)."""
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"corloc: {len(pred_boxes)} predicted boxes for {len(gt_boxes)} images")
    if len(gt_boxes) == 0:
        raise ValueError("corloc: no images (empty input)")
    hits = sum(bool(len(g) and (box_iou(p, torch.as_tensor(g)) >= threshold).any()) for p, g in zip(pred_boxes, gt_boxes))
    return hits / len(gt_boxes)


def confusion(pred: torch.Tensor, true: torch.Tensor, num_pred: int, num_true: int, ignore: int = 255) -> np.ndarray:
    """Pixel counts ``[num_pred, num_true]``; pixels whose true label is ``ignore`` are skipped."""
    if pred.shape != true.shape:
        raise ValueError(f"confusion: pred shape {tuple(pred.shape)} != true shape {tuple(true.shape)}")
    p, t = pred.reshape(-1).long(), true.reshape(-1).long()
    keep = t != ignore
    p, t = p[keep], t[keep]
    if p.numel() and (p.max() >= num_pred or t.max() >= num_true or p.min() < 0 or t.min() < 0):
        raise ValueError(f"confusion: labels outside [0, {num_pred}) x [0, {num_true})")
    return torch.bincount(p * num_true + t, minlength=num_pred * num_true).reshape(num_pred, num_true).numpy()


def matched_miou(table: np.ndarray, pred_ids, true_ids) -> dict[str, float]:
    """mIoU and pixel accuracy of a confusion matrix ``[num_pred, num_true]`` under a one-to-one
    matching: predicted class ``pred_ids[i]`` is true class ``true_ids[i]``; unmatched predicted
    classes count as false positives of nothing (their pixels are misses). A class's IoU is
    matched / (true + predicted - matched) pixels; mIoU averages over the true classes with a
    non-empty union (present in the truth or predicted), as STEGO and mmsegmentation do, so a
    class predicted where the truth has none scores 0 rather than being left out."""
    table = np.asarray(table, dtype=np.float64)
    rows, cols = np.asarray(pred_ids, dtype=np.int64), np.asarray(true_ids, dtype=np.int64)
    matched = np.zeros(table.shape[1])
    pred_total = np.zeros(table.shape[1])
    matched[cols] = table[rows, cols]
    pred_total[cols] = table[rows].sum(1)
    union = table.sum(0) + pred_total - matched
    counted = union > 0
    total = table.sum()
    return {
        "miou": float((matched[counted] / union[counted]).mean()) if counted.any() else 0.0,
        "pixel_accuracy": float(matched.sum() / total) if total else 0.0,
    }


def hungarian_miou(table: np.ndarray) -> dict[str, float]:
    """:func:`matched_miou` of a confusion matrix ``[num_pred, num_true]`` after the one-to-one
    matching of predicted to true classes that maximises matched pixels."""
    table = np.asarray(table, dtype=np.float64)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return matched_miou(table, rows, cols)


def cluster_scores(pred, true) -> dict[str, float]:
    """NMI, ARI and purity of clusters ``pred`` against labels ``true`` (items with label < 0 dropped)."""
    p, t = _labels(pred, "pred"), _labels(true, "true")
    keep = t >= 0
    return {"nmi": nmi(p[keep], t[keep]), "ari": ari(p[keep], t[keep]), "purity": purity(p[keep], t[keep])}
