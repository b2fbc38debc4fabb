"""Ground truth in the annotation-store format (the supervised twin of each self-guided run).

:func:`pack_gt` turns data samples (``gt_label``, ``gt_boxes``, ``gt_box_labels``,
``gt_mask``, see :mod:`sgdm.data.base`) into fixed-shape tensors that fit a
safetensors shard; :func:`ground_truth_records` makes store records of them:

* ``label``: ``cluster = gt_label`` (ImageNet-100 class);
* ``box``: the largest ground-truth box, normalised, and its class as ``cluster``
  (one box per image, like LOST); an image with no ground-truth box left after
  the centre crop (no objects, all outside the crop, only ``difficult`` ones) has
  no guidance: it gets the store's no-annotation marker (``cluster`` -1, box
  zeros, see :mod:`sgdm.annotation.store`), and the manifest counts and lists
  such images (``images_without_gt_box``, ``ids_without_gt_box``);
* ``mask``: ``gt_mask`` as the class map (dataset values, 255 = ignore).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from sgdm.annotation.store import IGNORE, NO_ANNOTATION, mask_blocks
from sgdm.config.core import ConfigError

__all__ = ["pack_gt", "unpack_boxes", "ground_truth_records"]


def pack_gt(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Fixed-shape tensors of the ground truth of ``samples`` (keys present only if the data has them)."""
    out: dict[str, torch.Tensor] = {}
    if not samples:
        return out
    first = samples[0]
    if "gt_label" in first:
        out["gt_label"] = torch.tensor([int(s["gt_label"]) for s in samples], dtype=torch.long)
    if "gt_boxes" in first:
        boxes = [torch.as_tensor(s["gt_boxes"], dtype=torch.float32).reshape(-1, 4) for s in samples]
        out["gt_boxes"] = torch.cat(boxes)
        out["gt_box_count"] = torch.tensor([len(b) for b in boxes], dtype=torch.long)
        if "gt_box_labels" in first:
            labels = [torch.as_tensor(s["gt_box_labels"], dtype=torch.long).reshape(-1) for s in samples]
            out["gt_box_labels"] = torch.cat(labels)
    if "gt_mask" in first:
        out["gt_mask"] = torch.stack([torch.as_tensor(s["gt_mask"]).to(torch.uint8) for s in samples])
    return out


def unpack_boxes(gt: dict[str, torch.Tensor], key: str = "gt_boxes") -> list[torch.Tensor]:
    """Per-image ``[n_i, 4]`` boxes (or ``[n_i]`` labels for ``key='gt_box_labels'``)."""
    return list(torch.split(gt[key], gt["gt_box_count"].tolist()))


def _need(gt: dict, key: str, granularity: str) -> torch.Tensor:
    if key not in gt:
        raise ConfigError("annotation.source",
                          f"'gt' with granularity {granularity!r} needs '{key}', which this dataset does not provide")
    return gt[key]


def _check_range(values: torch.Tensor, num_classes: int, key: str, what: str) -> None:
    """Refuse values >= K (K too small) and negative ones (the callers leave out rows with the
    no-annotation marker)."""
    if not values.numel():
        return
    if int(values.max()) >= num_classes:
        raise ConfigError(key, f"{num_classes} is too small: the ground truth has {what} {int(values.max())}")
    if int(values.min()) < 0:
        raise ValueError(f"ground truth: {what} {int(values.min())} is negative (only an image without any "
                         f"ground-truth box gets the no-annotation marker {NO_ANNOTATION})")


def ground_truth_records(gt: dict[str, torch.Tensor], granularity: str, num_classes: int, image_hw: Sequence[int],
                         ids: Sequence[str]) -> tuple[dict, dict]:
    """Store records and manifest extras made from packed ground truth ``gt``."""
    if granularity == "label":
        labels = _need(gt, "gt_label", granularity)
        missing = (labels < 0).nonzero().flatten()
        if missing.numel():
            raise ValueError(f"ground truth: {missing.numel()} images have no class label (e.g. {ids[int(missing[0])]!r})")
        _check_range(labels, num_classes, "annotation.num_classes", "class id")
        return {"cluster": labels}, {}
    if granularity == "box":
        return _box_records(gt, num_classes, image_hw, ids)
    masks = _need(gt, "gt_mask", granularity)
    extremes = []  # of each block's valid values: never a bool or a copy of every pixel of the store
    for _, block in mask_blocks(masks):
        valid = block[block != IGNORE]
        extremes += [valid.min(), valid.max()] if valid.numel() else []
    _check_range(torch.stack(extremes) if extremes else masks.new_zeros(0), num_classes, "annotation.num_classes",
                 "mask value")
    return {"mask": masks}, {}


def _box_records(gt, num_classes, image_hw, ids) -> tuple[dict, dict]:
    boxes = unpack_boxes({"gt_boxes": _need(gt, "gt_boxes", "box"), "gt_box_count": gt["gt_box_count"]})
    labels = unpack_boxes(gt, "gt_box_labels") if "gt_box_labels" in gt else [None] * len(boxes)
    image_labels = gt.get("gt_label", torch.zeros(len(boxes), dtype=torch.long))
    h, w = image_hw
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    out_boxes, clusters, empty = [], [], []
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        if len(b) == 0:  # no guidance: the marker, never a class (it used to be gt_label -1 clamped to class 0)
            empty.append(ids[i])
            out_boxes.append(torch.zeros(4))
            clusters.append(NO_ANNOTATION)
            continue
        j = int(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).argmax())
        out_boxes.append((b[j] / scale).clamp(0, 1))
        clusters.append(int(lab[j]) if lab is not None else int(image_labels[i]))
    cluster = torch.tensor(clusters, dtype=torch.long)
    key = "annotation.lost.num_clusters"  # K of box guidance (see sgdm.config.schema.guidance_classes_key)
    annotated = torch.tensor([len(b) > 0 for b in boxes], dtype=torch.bool)
    _check_range(cluster[annotated], num_classes, key, "box class")
    if len(empty) == len(ids):
        raise ValueError(f"ground truth: none of the {len(ids)} images has a ground-truth box left after the "
                         f"centre crop (e.g. {ids[0]!r}); there is nothing to guide with")
    return ({"cluster": cluster, "box": torch.stack(out_boxes)},
            {"images_without_gt_box": len(empty), "ids_without_gt_box": empty})
