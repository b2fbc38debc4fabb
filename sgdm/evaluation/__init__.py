"""Evaluation: FID/IS/KID, Frechet distance in any feature space, layout adherence.

Submodules are imported lazily (``sgdm.evaluation.config`` must stay light).
"""
from __future__ import annotations

import importlib

_LAZY = {"evaluate_run": "sgdm.evaluation.evaluate"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgdm.evaluation' has no attribute {name!r}")


__all__ = ["evaluate_run"]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # the lazy names too: tab completion lists dir()
