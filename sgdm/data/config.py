"""Data section of the experiment config (``data:``); imports nothing heavy.

Every dataset kind reads from ``root`` (except the built-in ``shapes``) and
yields the same sample dicts (see :mod:`sgdm.data.base`). Paths are not checked
here, only when the dataset is built, so a config can be validated on a machine
that lacks the data.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal, Optional

from sgdm.config.core import ConfigError, require_at_least

DatasetKind = Literal[
    "shapes", "image_folder", "lsun_lmdb", "lsun_list", "imagenet100", "voc", "coco20k", "coco_stuff27"
]

# split names each kind understands; None = any name (it only labels the ids)
SPLITS: dict[str, Optional[tuple[str, ...]]] = {
    "shapes": ("train", "val"),
    "image_folder": None,
    "lsun_lmdb": None,
    "lsun_list": None,
    "imagenet100": ("train", "val"),
    "voc": ("train", "val", "trainval", "test"),
    "coco20k": ("train",),
    "coco_stuff27": ("train", "val"),
}


@dataclasses.dataclass
class ShapesConfig:
    """The built-in procedural dataset (:mod:`sgdm.data.shapes`).

    ``num_images`` train and ``num_val_images`` val images of ``image_size``
    pixels, deterministic from ``seed``; cached under ``cache_dir`` (default
    ``$SGDM_CACHE`` or ``~/.cache/sgdm``).
    """

    num_images: int = 10000
    num_val_images: int = 1000
    seed: int = 0
    image_size: int = 64
    cache_dir: Optional[pathlib.Path] = None

    def validate(self) -> None:
        require_at_least(self, 1, "num_images", "num_val_images")
        if not 16 <= self.image_size <= 1024:
            raise ConfigError("image_size", f"must be in [16, 1024], got {self.image_size}")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")


@dataclasses.dataclass
class DataConfig:
    """Which images to read and how to preprocess them.

    dataset: kind of dataset (see ``sgdm.data.build_dataset``).
    root: dataset directory (LMDB directory for ``lsun_lmdb``; COCO / VOC /
        ImageNet roots as documented per kind). Unused by ``shapes``.
    split: which part to read (``train``/``val`` for shapes, imagenet100 and
        coco_stuff27; a VOC ImageSets name such as ``trainval``).
    list_file: text file of relative image paths (``lsun_list``, optional for
        ``image_folder``), of COCO-20K file names (``coco20k``, required), or of
        image ids (``coco_stuff27``, default: the curated list under root).
    annotation_file: COCO instances JSON (``coco20k``; default
        ``root/annotations/instances_train2014.json``).
    class_list: WordNet ids, one a line, anything after the id ignored (``imagenet100``;
        default: CMC's list shipped with sgdm); the label is the line's index.
    val_labels: ``imagenet100`` only: the ground truth of ImageNet's official flat val folder
        (``LOC_val_solution.csv``, or the devkit's ``ILSVRC2012_validation_ground_truth.txt`` with
        its ``meta.mat`` beside it), for ``split: val`` in that layout; see
        :mod:`sgdm.data.imagenet_val`.
    folder_labels: ``image_folder`` only: first-level folder name is the class.
    keep_difficult: ``voc`` only: keep boxes marked difficult.
    size: output side in pixels (centre crop to the short side, then resize).
    flip: random horizontal flip when building a training dataset.
    on_bad_image: ``skip`` (log and count, return None for that index) or
        ``raise`` (error naming the file and index).
    num_workers: DataLoader worker processes.
    max_images: keep only the first N images (in the dataset's id order).
    """

    dataset: DatasetKind = "shapes"
    root: Optional[pathlib.Path] = None
    split: str = "train"
    list_file: Optional[pathlib.Path] = None
    annotation_file: Optional[pathlib.Path] = None
    class_list: Optional[pathlib.Path] = None
    val_labels: Optional[pathlib.Path] = None
    folder_labels: bool = False
    keep_difficult: bool = True
    size: int = 256
    flip: bool = True
    on_bad_image: Literal["skip", "raise"] = "skip"
    num_workers: int = 4
    max_images: Optional[int] = None
    shapes: ShapesConfig = dataclasses.field(default_factory=ShapesConfig)

    def validate(self) -> None:
        if self.dataset != "shapes" and self.root is None:
            raise ConfigError("root", f"required for dataset {self.dataset!r} (the directory holding it)")
        allowed = SPLITS[self.dataset]
        if allowed is not None and self.split not in allowed:
            raise ConfigError("split", f"dataset {self.dataset!r} has splits {', '.join(allowed)}; got {self.split!r}")
        if self.dataset in ("lsun_list", "coco20k") and self.list_file is None:
            what = "relative image paths" if self.dataset == "lsun_list" else "COCO-20K file names"
            raise ConfigError("list_file", f"required for dataset {self.dataset!r} (a text file of {what})")
        if self.val_labels is not None and self.dataset != "imagenet100":
            raise ConfigError("val_labels", "only applies to dataset 'imagenet100' (ImageNet's flat val folder)")
        if self.folder_labels and self.dataset != "image_folder":
            raise ConfigError("folder_labels", "only applies to dataset 'image_folder'")
        if self.size < 8:
            raise ConfigError("size", f"must be >= 8 pixels, got {self.size}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError("max_images", f"must be >= 1 or null, got {self.max_images}")
