"""The offline quickstart: prepare missing artefacts, then report on the run.

``prepare(cfg)`` and ``write_report(cfg, run_dir)`` are imported lazily so that
reading :class:`~sgdm.quickstart.config.PrepareConfig` stays cheap.
"""
from __future__ import annotations

import importlib

_LAZY = {"prepare": "sgdm.quickstart.stages", "write_report": "sgdm.quickstart.report"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgdm.quickstart' has no attribute {name!r}")


__all__ = ["prepare", "write_report"]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # the lazy names too: tab completion lists dir()
