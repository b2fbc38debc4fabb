"""Budgets and hyper-parameters of DINO-style feature pretraining (light imports)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sgdm.config.core import ConfigError, check_device, check_seed


@dataclass
class PretrainConfig:
    """DINO self-distillation (Caron et al. 2021) on the unlabeled training images.

    The architecture (a timm name + kwargs) and the output file come from the
    annotation section (``backbone``, ``backbone_kwargs``, ``weights``), so the
    encoder trained here is exactly the one ``annotate`` loads.

    ``weight_decay_end``, ``decay_bias_and_norm``, ``clip_grad``, ``clip_grad_scope``,
    ``freeze_last_layer_steps`` and the teacher-temperature warm-up complete DINO's optimisation
    recipe (main_dino.py). Their defaults keep sgdm's earlier training exactly (one gradient-norm
    clip over all parameters at 3.0, the last layer trained from the start, a constant weight decay
    on every parameter, a constant teacher temperature): encoders made before them are reproduced
    bit for bit. DINO's settings: ``clip_grad_scope: per_parameter`` (at 3.0),
    ``freeze_last_layer_steps`` about one epoch of steps, ``weight_decay_end: 0.4``,
    ``decay_bias_and_norm: false``; its default teacher warm-up (0.04 -> 0.04) is none.
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.04
    # Cosine schedule of the weight decay from weight_decay (step 0) to this value at the last step,
    # as DINO's 0.04 -> 0.4; None: constant weight_decay.
    weight_decay_end: float | None = None
    # True: AdamW decays every parameter; False: DINO's parameter groups, no decay on biases and on
    # 1-D tensors (norm gains and shifts); the weight-decay schedule applies to the decayed group only.
    decay_bias_and_norm: bool = True
    # Largest gradient norm (None: no clipping), over all parameters together ("total",
    # torch.nn.utils.clip_grad_norm_) or per parameter tensor ("per_parameter": DINO's clip_grad 3.0,
    # each tensor's gradient scaled down to this norm on its own, smaller ones left alone).
    clip_grad: float | None = 3.0
    clip_grad_scope: Literal["total", "per_parameter"] = "total"
    # The head's last (weight-normed) layer gets no update during the first this-many steps: its
    # gradients are dropped, before the clipping (DINO's freeze_last_layer: 1 epoch, here
    # len(dataset) // batch_size steps, e.g. 62 for the quickstart's 2000 images at batch 32).
    freeze_last_layer_steps: int = 0
    # Every this many steps, write a checkpoint beside the encoder file (ENCODER.resume.pt, atomically) from
    # which a rerun of the same command continues bit for bit; the finished run deletes it. 0: none.
    checkpoint_every: int = 0
    warmup_steps: int = 20
    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    global_crops: int = 2
    local_crops: int = 4
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.1, 0.4)
    # Local crop side = round(data.size * local_crop_fraction); for a ViT both data.size and it must be
    # multiples of the patch size (refused before the first step otherwise, naming the fractions that fit).
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
    # "shared": every view blurred with blur_prob (3-tap kernel, sigma 0.1-1.0 px) and solarized with
    # solarize_prob; "dino": DINO's asymmetric views (global view 1 always blurred, view 2 blurred with p 0.1 and
    # solarized with p 0.2, local crops blurred with p 0.5; sigma 0.1-2.0 px): it sets those probabilities, so
    # blur_prob and solarize_prob stay at their defaults and global_crops at 2. See features_pretrain.augment.
    view_recipe: Literal["shared", "dino"] = "shared"
    # Crops turned by up to this many degrees: orientation stops being shared between views.
    max_rotation: float = 0.0
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    # Teacher temperature warm-up (DINO's warmup_teacher_temp / warmup_teacher_temp_epochs): linear
    # from warmup_teacher_temp at step 0 to teacher_temp at step warmup_teacher_temp_steps - 1, then
    # teacher_temp. None / 0 (set both or neither): teacher_temp throughout.
    warmup_teacher_temp: float | None = None
    warmup_teacher_temp_steps: int = 0
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        check_device("device", self.device)
        check_seed("seed", self.seed)
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
        if self.view_recipe == "dino":
            if self.global_crops != 2:
                raise ConfigError("global_crops", f"view_recipe dino makes DINO's 2 global views (one always blurred, "
                                                  f"one solarized at times), got {self.global_crops}; set 2, or "
                                                  "view_recipe: shared")
            for name in ("blur_prob", "solarize_prob"):
                default = PretrainConfig.__dataclass_fields__[name].default
                if getattr(self, name) != default:
                    raise ConfigError(name, f"view_recipe dino sets each view's blur and solarization probability "
                                            f"(DINO's), got {getattr(self, name)}; leave {name} at its default "
                                            f"{default}, or set view_recipe: shared")
        for name in ("student_temp", "teacher_temp"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("center_momentum", "teacher_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"expected in [0, 1), got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        for name in ("weight_decay", "weight_decay_end"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(name, f"must be >= 0, got {value}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError("clip_grad", f"must be > 0 (or null: no clipping), got {self.clip_grad}")
        for name in ("freeze_last_layer_steps", "warmup_teacher_temp_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.warmup_teacher_temp is not None and self.warmup_teacher_temp <= 0:
            raise ConfigError("warmup_teacher_temp", f"must be > 0, got {self.warmup_teacher_temp}")
        if (self.warmup_teacher_temp is None) != (self.warmup_teacher_temp_steps == 0):
            key = "warmup_teacher_temp" if self.warmup_teacher_temp is None else "warmup_teacher_temp_steps"
            raise ConfigError(key, "set warmup_teacher_temp and warmup_teacher_temp_steps (> 0) together, "
                                   f"got {self.warmup_teacher_temp} and {self.warmup_teacher_temp_steps}")
