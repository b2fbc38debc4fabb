"""``build_dataset``: one entry point from a :class:`~sgdm.data.config.DataConfig` to a dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from sgdm.config.core import ConfigError
from sgdm.data.base import ImageDataset
from sgdm.data.config import SPLITS, DataConfig


def build_dataset(cfg: DataConfig, train: bool = True, *, seed: int = 0, split: Optional[str] = None,
                  key: str = "data") -> ImageDataset:
    """The dataset ``cfg`` describes.

    train: apply the random horizontal flip (when ``cfg.flip``); evaluation and
        annotation pass False and get unflipped images.
    seed: flip seed (the run seed); flip(i) = coin(seed, epoch, i), see
        :meth:`ImageDataset.set_epoch`. Shapes' content seed is ``cfg.shapes.seed``.
    split: overrides ``cfg.split`` (e.g. ``"val"`` for evaluation).
    key: key path of ``cfg`` in the experiment config, used in error messages.

    Raises ConfigError naming the key (``data.root``, ``data.list_file``, ...)
    when the data is missing or empty.
    """
    split = cfg.split if split is None else split
    allowed = SPLITS[cfg.dataset]
    if allowed is not None and split not in allowed:
        raise ConfigError(f"{key}.split", f"dataset {cfg.dataset!r} has splits {', '.join(allowed)}; got {split!r}")
    common = dict(size=cfg.size, flip=bool(train and cfg.flip), on_bad_image=cfg.on_bad_image,
                  exif_orientation=cfg.exif_orientation)
    kind = cfg.dataset
    root = Path(cfg.root) if cfg.root is not None else None
    if kind != "shapes" and root is None:
        raise ConfigError(f"{key}.root", f"required for dataset {kind!r}")
    if kind == "shapes":
        from sgdm.data.shapes import ShapesDataset

        s = cfg.shapes
        n = s.num_images if split == "train" else s.num_val_images
        if cfg.max_images is not None:
            n = min(n, cfg.max_images)
        return ShapesDataset(n, s.image_size, s.seed, split, s.cache_dir, flip_seed=seed, **common)
    if kind in ("image_folder", "lsun_list"):
        from sgdm.data.folders import image_folder

        return image_folder(root, cfg.list_file, cfg.folder_labels, cfg.max_images, key, name=kind, seed=seed,
                            **common)
    if kind == "imagenet100":
        from sgdm.data.folders import imagenet100

        return imagenet100(root, split, cfg.class_list, cfg.max_images, key, cfg.val_labels, seed=seed, **common)
    if kind == "lsun_lmdb":
        from sgdm.data.lsun import LsunLmdbDataset

        return LsunLmdbDataset(root, cfg.max_images, key, seed=seed, **common)
    if kind == "voc":
        from sgdm.data.voc import VocDataset

        return VocDataset(root, split, cfg.keep_difficult, cfg.max_images, key, seed=seed, **common)
    if kind == "coco20k":
        from sgdm.data.coco import Coco20kDataset

        return Coco20kDataset(root, cfg.list_file, cfg.annotation_file, cfg.max_images, key, seed=seed, **common)
    if kind == "coco_stuff27":
        from sgdm.data.coco import CocoStuff27Dataset

        return CocoStuff27Dataset(root, split, cfg.list_file, cfg.max_images, key, seed=seed, **common)
    raise ConfigError(f"{key}.dataset", f"unknown dataset kind {kind!r}")
