"""One data layer for annotation, training and evaluation.

``build_dataset(cfg, train)`` returns a map-style dataset of sample dicts
(``image``, ``id``, ``flipped``, and ground truth where the dataset has it; see
:mod:`sgdm.data.base`); ``collate_samples`` batches them. Kinds: ``shapes``
(built in, offline), ``image_folder``, ``lsun_lmdb``, ``lsun_list``,
``imagenet100``, ``voc``, ``coco20k``, ``coco_stuff27``.

Heavy modules (torch, PIL) load on first use so ``sgdm.data.config`` stays light.
"""
from __future__ import annotations

from sgdm._lazy import lazy_attributes

from sgdm.data.config import DataConfig, ShapesConfig

_LAZY = {
    "build_dataset": "sgdm.data.build",
    "collate_samples": "sgdm.data.collate",
    "ImageDataset": "sgdm.data.base",
    "BadImageError": "sgdm.data.decode",
    "open_image": "sgdm.data.decode",
    "flip_coin": "sgdm.data.transforms",
}

__all__ = ["DataConfig", "ShapesConfig", *_LAZY]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
