"""Models of self-guided latent diffusion: the KL autoencoder, the guided UNet, conditioning.

``UNet`` (:mod:`sgdm.models.unet`), ``AutoencoderKL`` (:mod:`sgdm.models.autoencoder`) and
their config sections (:mod:`sgdm.models.config`) are importable from here; they, and the
other submodules (``conditioning``, ``checkpoints``, ``layers``, ``compile``), load on first
use, so that loading a config does not import torch.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "UNet": "sgdm.models.unet",
    "AutoencoderKL": "sgdm.models.autoencoder",
    "ModelConfig": "sgdm.models.config",
    "UNetConfig": "sgdm.models.config",
    "AutoencoderConfig": "sgdm.models.config",
    "GuidanceConfig": "sgdm.models.config",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgdm.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # the lazy names too: tab completion lists dir()
