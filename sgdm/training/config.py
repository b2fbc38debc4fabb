"""``train:`` section: optimiser, schedule, precision, strategy, checkpoints, logging.

Light imports only (no torch) so a config validates in milliseconds.
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from sgdm.config.core import ConfigError

Precision = Literal[32, "32", "32-true", "bf16-mixed", "fp16-mixed", "16-mixed"]


@dataclass
class TrainConfig:
    """How the denoiser is optimised.

    ``batch_size`` is the *global* batch of one optimiser step: all devices and
    all ``accumulate`` micro-batches together. Each device therefore sees
    ``batch_size / (world_size * accumulate)`` images per micro-batch, and the
    learning rate ``lr`` is used as given (no scaling by device count or batch).
    ``max_steps`` counts optimiser steps, including steps skipped for a
    non-finite loss (``on_nan: skip``), so data order never depends on faults.
    AdamW with a linear warm-up over ``warmup_steps`` to ``lr``, then constant
    (LDM). EMA: ``ema_decay`` with warm-up ``min(decay, (1 + n) / (10 + n))``
    at the n-th update, n = 1, 2, ... (LDM's LitEma). Checkpoints every ``checkpoint_every`` steps (atomic),
    keeping the newest ``keep_checkpoints``. A sample grid every
    ``sample_every`` steps (0: never) with one row per guidance scale in
    ``sample_scales`` (label guidance: one row per cluster at each scale).
    ``compile``: the denoiser runs under ``torch.compile`` (Inductor, ``compile_mode``; see
    :mod:`sgdm.models.compile`); the first step compiles, checkpoints are unchanged.
    """

    batch_size: int = 64
    accumulate: int = 1
    max_steps: int = 100000
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1.0e-8
    warmup_steps: int = 0
    grad_clip: Optional[float] = None
    precision: Precision = "32"
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: Union[int, Literal["auto"]] = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    on_nan: Literal["skip", "raise"] = "skip"
    max_consecutive_nan: int = 10
    log_every: int = 50
    logger: Literal["tensorboard", "csv", "none"] = "tensorboard"
    progress_bar: bool = True
    sample_every: int = 5000
    sample_scales: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0])
    sample_steps: int = 50
    sample_per_row: int = 8
    sample_max_clusters: int = 8
    cache_latents: bool = False
    cache_dir: Optional[pathlib.Path] = None
    cache_shard_size: int = 1024
    export_pipeline: bool = True
    compile: bool = False
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"

    @property
    def precision_name(self) -> str:
        """Lightning's spelling of the precision flag."""
        return {"32": "32-true", "32-true": "32-true", "16-mixed": "16-mixed", "fp16-mixed": "16-mixed",
                "bf16-mixed": "bf16-mixed"}[str(self.precision)]

    def world_size(self) -> Optional[int]:
        """Processes taking part, when known from the config (``devices: auto`` is not)."""
        return None if self.devices == "auto" else self.devices * self.num_nodes

    def validate(self) -> None:
        for name in ("batch_size", "accumulate", "max_steps", "checkpoint_every", "keep_checkpoints",
                     "max_consecutive_nan", "log_every", "sample_steps", "sample_per_row",
                     "sample_max_clusters", "cache_shard_size", "num_nodes"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_every"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        # AdamW refuses some of these only when built (after data preparation), and nan/inf diverge
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("lr", f"must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError("weight_decay", f"must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            raise ConfigError("adam_eps", f"must be a finite number > 0, got {self.adam_eps}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ConfigError("grad_clip", f"must be a finite number > 0, or null (no clipping), got {self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"betas[{i}]", f"must be in [0, 1), got {beta}")
        if isinstance(self.devices, int) and self.devices < 1:
            raise ConfigError("devices", f"must be >= 1 or 'auto', got {self.devices}")
        world = self.world_size()
        per_step = (world or 1) * self.accumulate
        if self.batch_size % per_step:
            raise ConfigError("batch_size", f"{self.batch_size} is the global batch per optimiser step and must "
                                            f"divide by devices x num_nodes x accumulate = {per_step}")
        if self.compile and self.strategy == "fsdp":
            # Lightning's FSDP wraps the submodules after the UNet was compiled in place; unproven here
            raise ConfigError("compile", "is not supported with strategy fsdp (untested); use ddp, or compile: false")
        if self.sample_every and not self.sample_scales:
            raise ConfigError("sample_scales", "needs at least one guidance scale when sample_every > 0")

    def micro_batch(self, world_size: int) -> int:
        """Images per device per micro-batch; raises a ConfigError naming ``train.batch_size``."""
        per_step = world_size * self.accumulate
        if self.batch_size % per_step:
            raise ConfigError("train.batch_size", f"{self.batch_size} does not divide by world size {world_size} "
                                                  f"x accumulate {self.accumulate}")
        return self.batch_size // per_step
