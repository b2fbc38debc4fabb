"""The map-style dataset every kind shares: read, convert, preprocess, handle bad files.

A sample is a dict::

    image         float32 [3, size, size] in [-1, 1]
    id            str, stable key used to join annotations (see AnnotationStore)
    flipped       bool, whether the horizontal flip was applied
    gt_label      int (class of the largest object, or the image class; -1 if none)
    gt_multi_hot  float32 [num_classes], classes present        (box/mask datasets)
    gt_boxes      float32 [n, 4] xyxy pixels of the returned image (box datasets)
    gt_box_labels int64 [n], class of each box                   (box datasets)
    gt_mask       int64 [size, size] class map, 255 = ignore       (mask datasets)

Class ids in ``gt_label``/``gt_box_labels``/``gt_multi_hot`` index
``class_names``; values in ``gt_mask`` index ``mask_class_names`` (which starts
with ``background`` for shapes and VOC, so there mask value = class id + 1).

Bad files are detected lazily, when an index is read. With
``on_bad_image="raise"`` a :class:`~sgdm.data.decode.BadImageError` names the
file and index. With ``"skip"`` the item is logged, recorded in
:attr:`ImageDataset.skipped` (of the process that read it; once per item, however many epochs
read it again) and ``None`` is
returned; :func:`sgdm.data.collate_samples` drops the Nones and reports how
many it dropped, so no other image is ever substituted silently.
``sgdm-ldm validate-data`` pre-scans a whole dataset with :meth:`check`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sgdm.data.decode import EXIF_ORIENTATIONS, BadImageError, printable, read_image
from sgdm.data.transforms import centre_crop, flip_coin, transform_boxes, transform_image, transform_mask

log = logging.getLogger(__name__)


@dataclass
class RawSample:
    """One decoded item before preprocessing; coordinates refer to ``image``'s pixels."""

    image: Image.Image
    label: Optional[int] = None  # image class; None = derive from the largest box
    boxes: Optional[np.ndarray] = None  # float [n, 4] xyxy
    box_labels: Optional[np.ndarray] = None  # int [n]
    mask: Optional[np.ndarray] = None  # uint8 [H, W]
    orientation: int = 1  # EXIF Orientation of the file as stored (2..8; 1 none), applied or not (decode.Decoded)


@dataclass(frozen=True)
class SkippedItem:
    index: int
    source: str
    reason: str


class ImageDataset(Dataset):
    """Base class: subclasses set ``ids`` and implement :meth:`source` and :meth:`load`.

    Attributes subclasses may set: ``class_names`` (labels of ``gt_label``),
    ``mask_class_names`` (values of ``gt_mask``), ``has_boxes``, ``has_masks``,
    ``has_labels``. Subclasses that read image files decode them with :meth:`read`,
    which applies ``exif_orientation`` (``data.exif_orientation``).
    """

    name = "dataset"
    has_labels = False
    has_boxes = False
    has_masks = False
    mask_offset = 1  # gt_mask value of class c is c + mask_offset (0 = background when 1)

    def __init__(self, ids: Sequence[str], *, size: int, flip: bool, on_bad_image: str, seed: int = 0,
                 class_names: Sequence[str] = (), mask_class_names: Sequence[str] = (),
                 exif_orientation: str = "ignore"):
        if on_bad_image not in ("skip", "raise"):
            raise ValueError(f"on_bad_image must be 'skip' or 'raise', got {on_bad_image!r}")
        if exif_orientation not in EXIF_ORIENTATIONS:
            raise ValueError(f"exif_orientation must be 'ignore' or 'apply', got {exif_orientation!r}")
        if exif_orientation == "apply" and (self.has_boxes or self.has_masks):
            raise ValueError(f"{self.name}: exif_orientation 'apply' would turn the image away from its boxes and "
                             "masks, which refer to the stored pixel grid")
        self.exif_orientation = exif_orientation
        self.ids = list(ids)
        self.size = int(size)
        self.flip = bool(flip)
        self.on_bad_image = on_bad_image
        self.seed = int(seed)
        self.epoch = 0
        self.class_names = list(class_names)
        self.mask_class_names = list(mask_class_names)
        self.skipped: list[SkippedItem] = []  # each unreadable item once, in the order first read
        self._skipped_indices: set[int] = set()

    # -- subclass interface -------------------------------------------------
    def source(self, index: int) -> str:
        """Human-readable location of item ``index`` (file path or LMDB key)."""
        raise NotImplementedError

    def load(self, index: int) -> RawSample:
        """Decode item ``index``; raise :class:`BadImageError` when it cannot be read."""
        raise NotImplementedError

    def item_files(self, index: int) -> tuple[str, ...]:
        """The files item ``index`` alone is read from (its image, and its mask or annotation file where it
        has its own); empty for items without files of their own (generated, in an LMDB). A run records
        their sizes to notice a file replaced in place (:mod:`sgdm.data.files`)."""
        return ()

    def read(self, source: str, data: Optional[bytes] = None, **fields: Any) -> RawSample:
        """The image file ``source`` (or its bytes ``data``) as a :class:`RawSample` with ``fields``,
        turned upright when ``exif_orientation`` is ``"apply"``."""
        decoded = read_image(source, data, self.exif_orientation)
        return RawSample(decoded.image, orientation=decoded.orientation, **fields)

    # -- public -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Choose the flips of ``epoch``: flip(i) = coin(seed, epoch, i), identical after a resume.

        Call it before iterating a DataLoader for that epoch: workers copy the
        dataset when the iterator starts (so persistent workers keep the old epoch).
        """
        self.epoch = int(epoch)

    def is_flipped(self, index: int) -> bool:
        return self.flip and flip_coin(self.seed, self.epoch, index)

    def check(self, index: int) -> Optional[SkippedItem]:
        """The file of item ``index`` that cannot be read and why, or None (no preprocessing)."""
        return self.inspect(index)[0]

    def inspect(self, index: int) -> tuple[Optional[SkippedItem], int]:
        """(:meth:`check`'s answer, the EXIF orientation of the image as stored: 1 when none or unreadable),
        from one read of the item."""
        try:
            raw = self._checked_load(index)
        except BadImageError as err:
            return SkippedItem(index, err.source, err.reason), 1
        return None, raw.orientation

    def _checked_load(self, index: int) -> RawSample:
        raw = self.load(index)
        if raw.mask is not None and raw.mask.shape != (raw.image.height, raw.image.width):
            raise BadImageError(self.source(index), f"mask is {raw.mask.shape[1]}x{raw.mask.shape[0]} "
                                f"but the image is {raw.image.width}x{raw.image.height}")
        return raw

    def __getitem__(self, index: int) -> Optional[dict[str, Any]]:
        if not 0 <= index < len(self.ids):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self.ids)} items")
        try:
            raw = self._checked_load(index)
        except BadImageError as err:
            if self.on_bad_image == "raise":
                raise err.at(index, self.name) from None
            if index not in self._skipped_indices:  # once: each epoch reads it again (the list and log would grow)
                self._skipped_indices.add(index)
                self.skipped.append(SkippedItem(index, err.source, err.reason))
                log.warning("%s: skipping bad image at index %d: %s: %s", self.name, index, printable(err.source),
                            err.reason)  # printable: a log file in UTF-8 refuses a name that is not
            return None
        return self.preprocess(raw, index)

    def preprocess(self, raw: RawSample, index: int) -> dict[str, Any]:
        flipped = self.is_flipped(index)
        crop = centre_crop(raw.image.width, raw.image.height, self.size)
        sample: dict[str, Any] = {
            "image": transform_image(raw.image, crop, flipped),
            "id": self.ids[index],
            "flipped": flipped,
        }
        label = raw.label
        if self.has_boxes:
            boxes, keep = transform_boxes(raw.boxes if raw.boxes is not None else np.zeros((0, 4)), crop, flipped)
            box_labels = np.asarray(raw.box_labels if raw.box_labels is not None else [], dtype=np.int64)[keep]
            sample["gt_boxes"] = boxes
            sample["gt_box_labels"] = torch.from_numpy(box_labels)
            sample["gt_multi_hot"] = self._multi_hot(box_labels)
            if label is None:  # largest surviving box: the crop may have removed objects
                areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
                label = int(box_labels[int(torch.argmax(areas))]) if len(box_labels) else -1
        if self.has_masks:
            mask = raw.mask
            if mask is None:  # e.g. a VOC image without SegmentationClass PNG: all ignore
                mask = np.full((raw.image.height, raw.image.width), 255, dtype=np.uint8)
            sample["gt_mask"] = transform_mask(mask, crop, flipped)
            if not self.has_boxes:
                label = self._mask_labels(sample, label)
        if self.has_labels or self.has_boxes:
            sample["gt_label"] = -1 if label is None else int(label)
        return sample

    def _mask_labels(self, sample: dict[str, Any], label: Optional[int]) -> int:
        """Multi-hot = classes present in the mask; label = its most frequent class."""
        histogram = np.bincount(sample["gt_mask"].numpy().ravel(), minlength=256)  # numpy: 20x faster than torch here
        counts = histogram[self.mask_offset : self.mask_offset + self.num_classes]
        sample["gt_multi_hot"] = torch.from_numpy(counts > 0).to(torch.float32)
        if label is not None:
            return label
        return int(np.argmax(counts)) if counts.any() else -1

    def _multi_hot(self, labels: np.ndarray) -> torch.Tensor:
        out = torch.zeros(self.num_classes, dtype=torch.float32)
        if len(labels):
            out[torch.from_numpy(np.asarray(labels, dtype=np.int64))] = 1.0
        return out


def limit(items: list, max_images: Optional[int]) -> list:
    return items if max_images is None else items[:max_images]
