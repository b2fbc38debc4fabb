"""One data layer for annotation, training and evaluation.

``build_dataset(cfg, train)`` returns a map-style dataset of sample dicts
(``image``, ``id``, ``flipped``, and ground truth where the dataset has it; see
:mod:`sgdm.data.base`); ``collate_samples`` batches them. Kinds: ``shapes``
(built in, offline), ``image_folder``, ``lsun_lmdb``, ``lsun_list``,
``imagenet100``, ``voc``, ``coco20k``, ``coco_stuff27``.

Heavy modules (torch, PIL) load on first use so ``sgdm.data.config`` stays light.
"""
from __future__ import annotations

import importlib

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


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgdm.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # the lazy names too: tab completion lists dir()
