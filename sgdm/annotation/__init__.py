"""Self-annotation (the paper's g and f, Sec. 3.2): clusters, LOST boxes, STEGO masks.

Public surface: :func:`annotate` (dataset -> annotation store), :class:`AnnotationStore`
(what training reads), :class:`AnnotationConfig` (the ``annotation:`` section).
Heavy modules load on first use.
"""
from __future__ import annotations

import importlib

from sgdm.annotation.config import AnnotationConfig

_LAZY = {
    "annotate": "sgdm.annotation.annotate",
    "AnnotationResult": "sgdm.annotation.annotate",
    "AnnotationStore": "sgdm.annotation.store",
    "StoreMismatchError": "sgdm.annotation.store",
    "write_store": "sgdm.annotation.store",
    "kmeans": "sgdm.annotation.kmeans",
    "load_backbone": "sgdm.annotation.features",
    "write_gallery": "sgdm.annotation.gallery",
}

__all__ = ["AnnotationConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgdm.annotation' has no attribute {name!r}")
