"""Package attributes that load their submodule on first use (PEP 562), so that importing a package
(a config section, ``import sgdm``) does not import torch or the heavy modules behind it."""
from __future__ import annotations

import importlib
import sys

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, lazy: dict[str, str]) -> tuple:  # no typing import: `import sgdm` stays bare
    """``(__getattr__, __dir__)`` for package ``package`` (its ``__name__``): attribute ``name`` in
    ``lazy`` is ``getattr(import_module(lazy[name]), name)``; ``dir()`` lists the lazy names with the
    package's own (tab completion reads it)."""

    def __getattr__(name: str):
        if name in lazy:
            return getattr(importlib.import_module(lazy[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        module = sys.modules[package]
        return sorted(set(vars(module)) | set(getattr(module, "__all__", ())) | set(lazy))

    return __getattr__, __dir__
