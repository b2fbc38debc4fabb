"""Training of self-guided latent diffusion models (Lightning), reliably resumable.

``train(cfg)`` in :mod:`sgdm.training.run`; the config section is
:class:`sgdm.training.config.TrainConfig`. Submodules load on use so that
``import sgdm.training.config`` stays light.
"""
from __future__ import annotations

from sgdm._lazy import lazy_attributes

_LAZY = {
    "train": "sgdm.training.run",
    "TrainConfig": "sgdm.training.config",
    "train_autoencoder": "sgdm.training.autoencoder",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
