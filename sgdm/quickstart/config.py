"""``prepare:`` section: which missing artefacts a run prepares before training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sgdm.config.core import ConfigError, check_seed, require_at_least
from sgdm.features_pretrain.config import PretrainConfig


@dataclass
class PrepareConfig:
    """Flags (prepare it when missing) and the small budgets to prepare with.

    Each artefact is only prepared when its file is absent, so repeated runs
    reuse what exists: ``dataset`` (the shapes cache), ``autoencoder``
    (``model.autoencoder`` checkpoint via ``train_autoencoder``), ``features``
    (``annotation.weights`` via DINO pretraining), ``annotations`` (the
    ``annotation`` store via ``annotate``); ``report`` writes the HTML and
    Markdown report after training.
    """

    dataset: bool = False
    autoencoder: bool = False
    features: bool = False
    annotations: bool = False
    report: bool = False
    autoencoder_steps: int = 400
    autoencoder_batch_size: int = 16  # the first stage sees full-resolution images: a smaller batch than the LDM's
    # The first stage's own seed, rate and micro-batches, not the diffusion run's run.seed and train.*: a
    # second diffusion run on the same prepared assets (another seed, rate, ...) reuses the autoencoder.
    # The defaults are what the shipped configs trained it with when it took those from the diffusion
    # run (run.seed 0, train.lr 2e-4, train.accumulate 1), so their autoencoder is unchanged.
    autoencoder_seed: int = 0
    # null: the diffusion run's train.lr (what runs recorded before this key had a default meant; a
    # changed train.lr then refuses the prepared autoencoder)
    autoencoder_lr: Optional[float] = 2.0e-4
    autoencoder_accumulate: int = 1  # micro-batches per step, to fit memory; must divide autoencoder_batch_size
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    report_samples_per_row: int = 8
    report_steps: int = 50
    report_scales: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0])
    report_eval_n: int = 256
    # Box- and mask-guided samples in the report come from two companion runs
    # (same network, self-boxed and self-segmented guidance) trained for
    # ``companion_steps`` steps under <run>/companions/ and reused when present.
    report_companions: bool = True
    companion_steps: int = 500
    companion_mask_classes: int = 0  # K of the self-segmented companion; 0: annotation.num_classes

    def any(self) -> bool:
        return self.makes_assets() or self.report

    def makes_assets(self) -> bool:
        """Whether a stage that runs before training is on (every flag but ``report``)."""
        return self.dataset or self.autoencoder or self.features or self.annotations

    def validate(self) -> None:
        require_at_least(self, 1, "autoencoder_batch_size", "autoencoder_steps", "autoencoder_accumulate",
                         "report_samples_per_row", "report_steps")
        check_seed("autoencoder_seed", self.autoencoder_seed)
        if self.autoencoder_lr is not None and not self.autoencoder_lr > 0:
            raise ConfigError("autoencoder_lr", f"must be > 0 (or null: train.lr), got {self.autoencoder_lr}")
        if self.autoencoder_batch_size % self.autoencoder_accumulate:  # its run is one device
            raise ConfigError("autoencoder_batch_size", f"{self.autoencoder_batch_size} must divide by "
                                                        f"prepare.autoencoder_accumulate={self.autoencoder_accumulate}")
        if not self.report_scales:
            raise ConfigError("report_scales", "needs at least one guidance scale")
        require_at_least(self, 1, "companion_steps")
        if self.companion_mask_classes < 0:
            raise ConfigError("companion_mask_classes", f"must be >= 0 (0: annotation.num_classes), got {self.companion_mask_classes}")
        if self.report_eval_n < 2:
            raise ConfigError("report_eval_n", f"need at least 2 samples, got {self.report_eval_n}")
