"""Typed configuration of the models: autoencoder (+ its training loss), UNet, guidance.

Light imports only (no torch), so configs load fast. Each dataclass validates its
own cross-field constraints in ``validate()``, raising ``ConfigError`` with the
key path relative to the section.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Literal, Optional

from sgdm.config.core import ConfigError

__all__ = [
    "AutoencoderLossConfig",
    "AutoencoderConfig",
    "UNetConfig",
    "GuidanceConfig",
    "ModelConfig",
    "level_resolutions",
]


def _check_positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(name, f"must be > 0, got {getattr(obj, name)}")


def _check_mult(mult: list[int], key: str) -> None:
    if not mult:
        raise ConfigError(key, "must have at least one level")
    for i, m in enumerate(mult):
        if m <= 0:
            raise ConfigError(f"{key}[{i}]", f"must be > 0, got {m}")


def level_resolutions(image_size: int, num_levels: int) -> list[int]:
    """Spatial size at each level of a resolution pyramid: image_size / 2**level."""
    return [image_size // 2**i for i in range(num_levels)]


@dataclasses.dataclass
class AutoencoderLossConfig:
    """LDM's ``LPIPSWithDiscriminator`` settings (kl-f8 defaults: kl 1e-6, disc from step 50001).

    ``vgg16_weights`` is a local torchvision VGG16 state dict for the LPIPS backbone;
    without it, ``vgg16_download: true`` takes torchvision's ImageNet VGG16 from the torch
    hub cache (downloading it when online, 60 s timeout per network operation; offline, a file
    that is not cached is an error at once), and otherwise the perceptual term is switched
    off (one warning). ``lpips_heads`` defaults to the linear heads shipped inside torchmetrics.
    """

    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0
    kl_weight: float = 1.0e-6
    logvar_init: float = 0.0
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_num_layers: int = 3
    disc_channels: int = 64
    vgg16_weights: Optional[pathlib.Path] = None
    vgg16_download: bool = False
    lpips_heads: Optional[pathlib.Path] = None

    def validate(self) -> None:
        for name in ("pixel_weight", "perceptual_weight", "kl_weight", "disc_weight", "disc_factor"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(name, f"must be a finite number >= 0, got {getattr(self, name)}")
        if not math.isfinite(self.logvar_init):
            raise ConfigError("logvar_init", f"must be finite, got {self.logvar_init}")
        if self.disc_start < 0:
            raise ConfigError("disc_start", f"must be >= 0, got {self.disc_start}")
        _check_positive(self, "disc_num_layers", "disc_channels")


@dataclasses.dataclass
class AutoencoderConfig:
    """LDM ``AutoencoderKL`` hyper-parameters (defaults: kl-f8, 256 px -> 4x32x32 latents).

    ``resolution`` is the nominal image size at which ``attn_resolutions`` are counted
    (the network itself takes any size divisible by the downsampling factor).

    ``checkpoint`` is a local file in LDM (full or first-stage) or diffusers layout.
    ``scale_factor`` None means "compute 1/std of the encoded latents once" and
    store it with the model; a number fixes it (LDM's Churches model uses 0.22765929).
    """

    embed_dim: int = 4
    z_channels: int = 4
    double_z: bool = True
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = dataclasses.field(default_factory=list)
    dropout: float = 0.0
    norm_groups: int = 32
    checkpoint: Optional[pathlib.Path] = None
    scale_factor: Optional[float] = None
    loss: AutoencoderLossConfig = dataclasses.field(default_factory=AutoencoderLossConfig)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        _check_positive(self, "embed_dim", "z_channels", "resolution", "in_channels", "out_ch",
                        "ch", "num_res_blocks", "norm_groups")
        _check_mult(self.ch_mult, "ch_mult")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.ch % self.norm_groups:
            raise ConfigError("norm_groups", f"ch={self.ch} is not divisible by norm_groups={self.norm_groups}")
        if self.resolution % self.downsample_factor:
            raise ConfigError("resolution", f"{self.resolution} is not divisible by the downsampling "
                                            f"factor {self.downsample_factor} of ch_mult={self.ch_mult}")
        reachable = level_resolutions(self.resolution, len(self.ch_mult))
        for i, r in enumerate(self.attn_resolutions):
            if r not in reachable:
                raise ConfigError(f"attn_resolutions[{i}]", f"{r} is not a level resolution; the levels are "
                                                            f"{reachable}")
        if self.scale_factor is not None and not 0 < self.scale_factor < math.inf:
            raise ConfigError("scale_factor", f"must be a finite number > 0, got {self.scale_factor}")
        for key in ("in_channels", "out_ch"):
            if getattr(self, key) != 3:
                # sgdm's datasets give RGB images, and the LPIPS and PatchGAN losses take RGB
                raise ConfigError(key, f"must be 3 (RGB images), got {getattr(self, key)}")


@dataclasses.dataclass
class UNetConfig:
    """ADM/LDM UNet sizes. ``attention_resolutions`` are latent resolutions (32 = the
    first level of a 32x32 latent), not downsampling factors. ``num_head_channels``
    > 0 overrides ``num_heads`` (heads = channels // num_head_channels).
    ``norm_groups`` is 32 as in LDM; smaller for tiny test models. ``cond_resize``
    picks how guidance maps are resized to the latent grid (nearest reads each latent
    cell at its centre, ``nearest-exact``, and keeps box masks binary; area gives
    coverage fractions).
    """

    in_channels: int = 4
    out_channels: int = 4
    channels: int = 192
    channel_mult: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 2, 4, 4])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = dataclasses.field(default_factory=lambda: [32, 16, 8, 4])
    num_heads: int = 8
    num_head_channels: int = -1
    dropout: float = 0.0
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    gradient_checkpointing: bool = False
    image_size: int = 32
    norm_groups: int = 32
    cond_resize: Literal["nearest", "area"] = "nearest"

    def heads_for(self, ch: int) -> int:
        return ch // self.num_head_channels if self.num_head_channels > 0 else self.num_heads

    def validate(self) -> None:
        _check_positive(self, "in_channels", "out_channels", "channels", "num_res_blocks", "image_size",
                        "norm_groups")
        _check_mult(self.channel_mult, "channel_mult")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.cond_resize not in ("nearest", "area"):  # the loader checks the Literal; code-made configs too
            raise ConfigError("cond_resize", f"must be one of nearest, area, got {self.cond_resize!r}")
        if self.num_head_channels <= 0 and self.num_heads <= 0:
            raise ConfigError("num_heads", f"must be > 0 when num_head_channels is -1, got {self.num_heads}")
        if self.num_head_channels == 0 or self.num_head_channels < -1:
            raise ConfigError("num_head_channels", f"must be -1 (use num_heads) or > 0, got "
                                                   f"{self.num_head_channels}")
        if self.channels % self.norm_groups:
            raise ConfigError("norm_groups", f"channels={self.channels} is not divisible by "
                                             f"norm_groups={self.norm_groups}")
        levels = len(self.channel_mult)
        if self.image_size % 2 ** (levels - 1):
            raise ConfigError("image_size", f"{self.image_size} is not divisible by 2**{levels - 1} "
                                            f"(channel_mult has {levels} levels)")
        reachable = level_resolutions(self.image_size, levels)
        for i, r in enumerate(self.attention_resolutions):
            if r not in reachable:
                raise ConfigError(f"attention_resolutions[{i}]", f"{r} is not reachable; with image_size="
                                  f"{self.image_size} and {levels} levels the resolutions are {reachable}")
        attn_channels = [self.channels * m for m, r in zip(self.channel_mult, reachable)
                         if r in self.attention_resolutions] + [self.channels * self.channel_mult[-1]]
        key = "num_head_channels" if self.num_head_channels > 0 else "num_heads"
        for ch in attn_channels:
            divisor = self.num_head_channels if self.num_head_channels > 0 else self.num_heads
            if ch % divisor:
                raise ConfigError(key, f"attention with {ch} channels is not divisible by {key}={divisor}")


@dataclasses.dataclass
class GuidanceConfig:
    """Which self-guidance the UNet takes (paper Sec. 3): ``label`` (Eq. 7), ``box``
    (Eq. 8) or ``mask`` (Eq. 9), from self-supervised annotations (``source: self``)
    or ground truth (``gt``). ``num_classes`` is K; ``drop_prob`` the probability p of
    replacing the guidance by the null condition during training.
    """

    kind: Literal["none", "label", "box", "mask"] = "none"
    source: Literal["self", "gt"] = "self"
    num_classes: int = 0
    drop_prob: float = 0.1

    def validate(self) -> None:
        if self.kind != "none" and self.num_classes <= 0:
            raise ConfigError("num_classes", f"must be > 0 for guidance kind '{self.kind}', got "
                                             f"{self.num_classes}")
        if self.num_classes < 0:
            raise ConfigError("num_classes", f"must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ConfigError("drop_prob", f"must be in [0, 1], got {self.drop_prob}")


@dataclasses.dataclass
class ModelConfig:
    """The ``model`` section: first stage, denoiser, guidance.

    Both networks are fully convolutional; ``autoencoder.resolution`` and ``unet.image_size``
    only place attention layers, so the data resolution is checked where the data is known.
    """

    autoencoder: AutoencoderConfig = dataclasses.field(default_factory=AutoencoderConfig)
    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    guidance: GuidanceConfig = dataclasses.field(default_factory=GuidanceConfig)

    def validate(self) -> None:
        if self.unet.in_channels != self.autoencoder.embed_dim:
            raise ConfigError("unet.in_channels", f"must equal autoencoder.embed_dim="
                                                  f"{self.autoencoder.embed_dim}, got {self.unet.in_channels}")
        if self.unet.out_channels != self.unet.in_channels:
            raise ConfigError("unet.out_channels", f"must equal unet.in_channels={self.unet.in_channels} "
                                                   f"(the UNet predicts noise in latent space)")
