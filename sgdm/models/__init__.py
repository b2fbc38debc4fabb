"""Models of self-guided latent diffusion: the KL autoencoder, the guided UNet, conditioning.

``UNet`` (:mod:`sgdm.models.unet`), ``AutoencoderKL`` (:mod:`sgdm.models.autoencoder`) and
their config sections (:mod:`sgdm.models.config`) are importable from here; they, and the
other submodules (``conditioning``, ``checkpoints``, ``layers``, ``compile``), load on first
use, so that loading a config does not import torch.
"""
from __future__ import annotations

from sgdm._lazy import lazy_attributes

_LAZY = {
    "UNet": "sgdm.models.unet",
    "AutoencoderKL": "sgdm.models.autoencoder",
    "ModelConfig": "sgdm.models.config",
    "UNetConfig": "sgdm.models.config",
    "AutoencoderConfig": "sgdm.models.config",
    "GuidanceConfig": "sgdm.models.config",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
