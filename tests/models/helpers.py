"""Tiny models shared by the model tests (build in milliseconds)."""
from __future__ import annotations

import torch

from sgdm.models.config import AutoencoderConfig, GuidanceConfig, UNetConfig

K = 5


def tiny_unet_config(**overrides) -> UNetConfig:
    cfg = dict(channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4], image_size=8,
               norm_groups=8, num_heads=2)
    cfg.update(overrides)
    return UNetConfig(**cfg)


def tiny_autoencoder_config(**overrides) -> AutoencoderConfig:
    cfg = dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16, norm_groups=8,
               z_channels=4, embed_dim=3)
    cfg.update(overrides)
    return AutoencoderConfig(**cfg)


def guidance(kind: str) -> GuidanceConfig:
    return GuidanceConfig(kind=kind, num_classes=K if kind != "none" else 0)


def randomize_(module: torch.nn.Module, generator: torch.Generator, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised output convs included) with small noise."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return module
