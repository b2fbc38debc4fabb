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

Memory: :class:`GroundTruthCollector` gathers the ground truth a batch at a time, the class maps
straight into one uint8 buffer sized for the dataset, so a ground-truth mask store holds one copy
of the maps (COCO-Stuff's 118k at 256 pixels: 7.7 GB). Holding the samples' own maps until the
end, as a list to stack, held them as int64 (:func:`sgdm.data.transforms.transform_mask`: 62 GB)
beside two uint8 copies.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from sgdm.annotation.store import IGNORE, NO_ANNOTATION, mask_blocks
from sgdm.config.core import ConfigError

__all__ = ["GroundTruthCollector", "pack_gt", "unpack_boxes", "ground_truth_records"]


class GroundTruthCollector:
    """The ground truth of up to ``capacity`` samples, added a batch at a time, packed as :func:`pack_gt` packs it.

    Which keys are packed is decided by the first sample (``gt_label``, ``gt_boxes``, ``gt_box_labels``,
    ``gt_mask``); every later sample must have them. Class maps are copied into one preallocated
    ``uint8 [capacity, h, w]`` buffer (allocated at the first map, whose shape every map must have) as
    they are added, so that no reference to a sample's own map (int64 from the datasets, 8 bytes a pixel)
    is kept and :meth:`packed` returns a view of that buffer, never a second copy. Boxes are concatenated
    a batch at a time (one tensor a batch, not one a sample: those from DataLoader workers are each a
    shared-memory mapping).
    """

    def __init__(self, capacity: int):
        self.capacity, self.count = int(capacity), 0
        self._keys: tuple[str, ...] = ()
        self._labels: list[int] = []
        self._boxes: list[torch.Tensor] = []
        self._box_counts: list[int] = []
        self._box_labels: list[torch.Tensor] = []
        self._masks: Optional[torch.Tensor] = None

    def add(self, samples: Sequence[dict[str, Any]], ids: Optional[Sequence[str]] = None) -> None:
        """Add the ground truth of ``samples`` (``ids``, their image ids, name an image in errors)."""
        if not samples:
            return
        names = list(ids) if ids is not None else [f"#{self.count + j}" for j in range(len(samples))]
        if self.count + len(samples) > self.capacity:
            raise ValueError(f"ground truth: {self.count + len(samples)} samples added to a collector of "
                             f"capacity {self.capacity}")
        if not self.count:
            self._keys = tuple(k for k in ("gt_label", "gt_boxes", "gt_box_labels", "gt_mask") if k in samples[0])
            if "gt_boxes" not in self._keys:
                self._keys = tuple(k for k in self._keys if k != "gt_box_labels")
        for s, name in zip(samples, names):
            missing = [k for k in self._keys if k not in s]
            if missing:
                raise ValueError(f"ground truth: image {name!r} has no {', '.join(missing)} (the images before it "
                                 f"have {', '.join(self._keys)})")
        if "gt_label" in self._keys:
            self._labels += [int(s["gt_label"]) for s in samples]
        if "gt_boxes" in self._keys:
            boxes = [torch.as_tensor(s["gt_boxes"], dtype=torch.float32).reshape(-1, 4) for s in samples]
            self._boxes.append(torch.cat(boxes))
            self._box_counts += [len(b) for b in boxes]
            if "gt_box_labels" in self._keys:
                self._box_labels.append(torch.cat([torch.as_tensor(s["gt_box_labels"], dtype=torch.long).reshape(-1)
                                                   for s in samples]))
        if "gt_mask" in self._keys:
            for row, (s, name) in enumerate(zip(samples, names), self.count):
                self._copy_mask(row, torch.as_tensor(s["gt_mask"]), name)
        self.count += len(samples)

    def _copy_mask(self, row: int, mask: torch.Tensor, name: str) -> None:
        if self._masks is None:
            self._masks = torch.empty((self.capacity, *mask.shape), dtype=torch.uint8)
        if mask.shape != self._masks.shape[1:]:  # copy_ would broadcast a [1, w] map silently
            raise ValueError(f"ground truth: the class map (gt_mask) of image {name!r} is {list(mask.shape)}, "
                             f"those before it {list(self._masks.shape[1:])}; every map must have one shape")
        if mask.dtype not in (torch.uint8, torch.bool) and mask.numel():
            low, high = torch.aminmax(mask)
            if low < 0 or high > IGNORE:  # uint8 would wrap it into another class
                bad = int(low) if low < 0 else int(high)
                raise ValueError(f"ground truth: the class map (gt_mask) of image {name!r} has value {bad}; "
                                 f"class maps hold 0-{IGNORE - 1} and {IGNORE} (ignore)")
        self._masks[row].copy_(mask)

    def packed(self) -> dict[str, torch.Tensor]:
        """Fixed-shape tensors of the samples added so far (keys present only if the data has them);
        ``gt_mask`` is a view of the collector's buffer (its first :attr:`count` rows), not a copy."""
        out: dict[str, torch.Tensor] = {}
        if not self.count:
            return out
        if "gt_label" in self._keys:
            out["gt_label"] = torch.tensor(self._labels, dtype=torch.long)
        if "gt_boxes" in self._keys:
            out["gt_boxes"] = torch.cat(self._boxes)
            out["gt_box_count"] = torch.tensor(self._box_counts, dtype=torch.long)
            if "gt_box_labels" in self._keys:
                out["gt_box_labels"] = torch.cat(self._box_labels)
        if "gt_mask" in self._keys:
            out["gt_mask"] = self._masks[: self.count]
        return out


def pack_gt(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Fixed-shape tensors of the ground truth of ``samples`` (keys present only if the data has them):
    ``gt_label`` int64 [n], ``gt_boxes`` float32 [sum n_i, 4] with ``gt_box_count`` int64 [n] and
    ``gt_box_labels`` int64 [sum n_i], ``gt_mask`` uint8 [n, h, w]."""
    collector = GroundTruthCollector(len(samples))
    collector.add(samples)
    return collector.packed()


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
