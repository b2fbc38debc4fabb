"""Training of self-guided latent diffusion models (Lightning), reliably resumable.

``train(cfg)`` in :mod:`sgdm.training.run`; the config section is
:class:`sgdm.training.config.TrainConfig`. Submodules load on use so that
``import sgdm.training.config`` stays light.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "train": "sgdm.training.run",
    "TrainConfig": "sgdm.training.config",
    "train_autoencoder": "sgdm.training.autoencoder",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgdm.training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # the lazy names too: tab completion lists dir()
