"""The offline quickstart: prepare missing artefacts, then report on the run.

``prepare(cfg)`` and ``write_report(cfg, run_dir)`` are imported lazily so that
reading :class:`~sgdm.quickstart.config.PrepareConfig` stays cheap.
"""
from __future__ import annotations

from sgdm._lazy import lazy_attributes

_LAZY = {"prepare": "sgdm.quickstart.stages", "write_report": "sgdm.quickstart.report"}

__all__ = ["prepare", "write_report"]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
