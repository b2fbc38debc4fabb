"""Evaluation: FID/IS/KID, Frechet distance in any feature space, layout adherence.

Submodules are imported lazily (``sgdm.evaluation.config`` must stay light).
"""
from __future__ import annotations

from sgdm._lazy import lazy_attributes

_LAZY = {"evaluate_run": "sgdm.evaluation.evaluate"}

__all__ = ["evaluate_run"]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
