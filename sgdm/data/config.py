"""Data section of the experiment config (``data:``); imports nothing heavy.

Every dataset kind reads from ``root`` (except the built-in ``shapes``) and
yields the same sample dicts (see :mod:`sgdm.data.base`). Paths are not checked
here, only when the dataset is built, so a config can be validated on a machine
that lacks the data.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Literal, Mapping, Optional

from sgdm.config.core import ConfigError, check_seed, require_at_least, to_dict

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

# file keys read by some kinds only; set for another kind, they are refused (val_labels is checked on its own)
FILE_KEYS: dict[str, tuple[str, ...]] = {
    "list_file": ("image_folder", "lsun_list", "coco20k", "coco_stuff27"),
    "annotation_file": ("coco20k",),
    "class_list": ("imagenet100",),
}

# kinds that may turn images by their EXIF orientation: the rest have boxes and masks on the stored
# pixel grid (voc, coco20k, coco_stuff27) or no files (shapes)
EXIF_KINDS = ("image_folder", "lsun_list", "lsun_lmdb", "imagenet100")

# data.* keys added after the data settings were first recorded (annotation store manifests, feature
# caches, pretrained-encoder metadata, latent caches, a run's config.yaml), each with the value every
# record that lacks it was made with. recorded_data() leaves such a key out at that value, and
# recorded_value() reads a missing one as that value, so an older record compares equal at that value
# and differs, by the key's name, at any other.
ADDED_KEYS: dict[str, Any] = {"exif_orientation": "ignore", "val_labels": None}


def recorded_data(data: "DataConfig") -> dict[str, Any]:
    """The data settings as records store them: ``to_dict(data)`` without :data:`ADDED_KEYS` at their value."""
    return {k: v for k, v in to_dict(data).items() if k not in ADDED_KEYS or v != ADDED_KEYS[k]}


def recorded_value(record: Mapping[str, Any], key: str) -> Any:
    """``record[key]`` of a record of ``data:``; a key of :data:`ADDED_KEYS` it lacks reads as its value there."""
    return record.get(key, ADDED_KEYS.get(key))


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
        check_seed("seed", self.seed)


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
    exif_orientation: ``ignore`` (default) reads the pixels as stored; ``apply``
        turns each image upright as its EXIF Orientation tag says (phone photos),
        before cropping. Only for ``image_folder``, ``lsun_list``, ``lsun_lmdb`` and
        ``imagenet100``: VOC/COCO boxes and masks refer to the stored pixel grid,
        and ``shapes`` has no files. Recorded (stores, caches, encoders) only when
        ``apply``, see :data:`ADDED_KEYS`.
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
    exif_orientation: Literal["ignore", "apply"] = "ignore"
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
        # a file key the kind does not read would be ignored without a word (a list_file meant as a subset)
        for name, kinds in FILE_KEYS.items():
            if getattr(self, name) is not None and self.dataset not in kinds:
                raise ConfigError(name, f"dataset {self.dataset!r} does not read it (it applies to "
                                        f"{', '.join(repr(k) for k in kinds)}); remove it")
        if self.folder_labels and self.dataset != "image_folder":
            raise ConfigError("folder_labels", "only applies to dataset 'image_folder'")
        if not self.keep_difficult and self.dataset != "voc":
            raise ConfigError("keep_difficult", "only applies to dataset 'voc' (its <difficult> boxes); remove it")
        if self.size < 8:
            raise ConfigError("size", f"must be >= 8 pixels, got {self.size}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError("max_images", f"must be >= 1 or null, got {self.max_images}")
        if self.exif_orientation == "apply" and self.dataset not in EXIF_KINDS:
            truth = {"voc": "boxes and masks", "coco20k": "boxes", "coco_stuff27": "masks"}.get(self.dataset)
            why = (f"its ground-truth {truth} refer to the stored pixel grid, which turning the image would break"
                   if truth else "its images are drawn, not read from files: there is no EXIF to apply")
            raise ConfigError("exif_orientation", f"'apply' is refused for dataset {self.dataset!r}: {why}; use "
                                                  f"'ignore' (apply is for {', '.join(EXIF_KINDS)})")
