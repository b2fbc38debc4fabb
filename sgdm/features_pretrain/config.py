"""Budgets and hyper-parameters of DINO-style feature pretraining (light imports)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sgdm.config.core import ConfigError, check_device


@dataclass
class PretrainConfig:
    """DINO self-distillation (Caron et al. 2021) on the unlabeled training images.

    The architecture (a timm name + kwargs) and the output file come from the
    annotation section (``backbone``, ``backbone_kwargs``, ``weights``), so the
    encoder trained here is exactly the one ``annotate`` loads.
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.04
    warmup_steps: int = 20
    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    global_crops: int = 2
    local_crops: int = 4
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.1, 0.4)
    local_crop_fraction: float = 0.5
    # Photometric augmentation strength. DINO's defaults (0.4 jitter, 0.2 grey)
    # teach colour invariance; lower them where colour defines the classes.
    color_jitter: float = 0.4
    # "dino": torchvision's ColorJitter (DINO's: brightness scales, contrast and saturation blend
    # with grey); "additive": kornia's plain ops (brightness adds, "contrast" scales, HSV
    # saturation), much stronger on dark images; see sgdm.features_pretrain.augment.
    color_jitter_style: Literal["additive", "dino"] = "additive"
    # Largest hue shift as a fraction of the colour circle; None: color_jitter / 4 (DINO's 0.1 at 0.4).
    hue_jitter: float | None = None
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    solarize_prob: float = 0.0
    # Crops turned by up to this many degrees: orientation stops being shared between views.
    max_rotation: float = 0.0
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        check_device("device", self.device)
        for name in ("steps", "batch_size", "out_dim", "hidden_dim", "bottleneck_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.global_crops < 2:
            raise ConfigError("global_crops", f"DINO needs at least 2 global crops, got {self.global_crops}")
        if self.local_crops < 0:
            raise ConfigError("local_crops", f"must be >= 0, got {self.local_crops}")
        for name in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(name, f"expected 0 < min <= max <= 1, got {[lo, hi]}")
        if not 0 < self.local_crop_fraction <= 1:
            raise ConfigError("local_crop_fraction", f"expected in (0, 1], got {self.local_crop_fraction}")
        if not 0 <= self.color_jitter <= 1:
            raise ConfigError("color_jitter", f"expected in [0, 1], got {self.color_jitter}")
        if not 0 <= self.max_rotation <= 180:
            raise ConfigError("max_rotation", f"expected degrees in [0, 180], got {self.max_rotation}")
        if self.hue_jitter is not None and not 0 <= self.hue_jitter <= 0.5:
            raise ConfigError("hue_jitter", f"expected a fraction of the colour circle in [0, 0.5], got {self.hue_jitter}")
        for name in ("grayscale_prob", "blur_prob", "solarize_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, f"expected a probability in [0, 1], got {getattr(self, name)}")
        if self.student_temp <= 0 or self.teacher_temp <= 0:
            raise ConfigError("teacher_temp", "temperatures must be > 0")
        for name in ("center_momentum", "teacher_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"expected in [0, 1), got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
