"""``eval:`` section of the experiment config (light imports only)."""
from __future__ import annotations

import pathlib
import string
from dataclasses import dataclass, field
from typing import Literal, Optional

from sgdm.config.core import ConfigError, check_device, check_kwargs, check_seed, require_at_least
from sgdm.diffusion.config import Spacing, check_eta

Metric = Literal["fid", "is", "kid", "fd", "adherence"]


@dataclass
class SegmenterConfig:
    """The small U-Net that scores ground-truth-mask runs when ``probe.input`` is ``pixels``
    (``sgdm.evaluation.segmenter``): three levels of ``width`` / 2x / 4x channels, ``epochs``
    passes of Adam with a one-cycle learning rate peaking at ``lr``, minibatches of
    ``batch_size`` real images."""

    width: int = 16
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3

    def validate(self) -> None:
        require_at_least(self, 1, "width", "epochs", "batch_size")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")


@dataclass
class ProbeConfig:
    """The supervised scorer of ground-truth-mask runs, trained on the dataset's real images
    and their masks. ``input: tokens`` (default): a linear probe on the annotation backbone's
    patch tokens (``sgdm.evaluation.probe``): ``epochs`` passes of Adam (``lr``,
    ``weight_decay``) over minibatches of ``batch_size`` real images. ``input: pixels``: a
    small U-Net on the images themselves (``segmenter`` settings), for encoders whose tokens
    do not hold the classes (on ``shapes`` the quickstart encoder's tokens carry colour, not
    shape: held-out mIoU 0.15 against 0.97 for the U-Net). ``held_out`` is the fraction of
    real images kept out of training to measure the scorer itself (the ceiling of the
    samples' score). ``max_images``: at most this many real images (a random subset drawn
    from ``eval.seed``; 0: all), because the images and their tokens are held in memory
    (COCO-Stuff's 118k images would take tens of GB)."""

    input: Literal["tokens", "pixels"] = "tokens"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.05
    weight_decay: float = 1e-4
    held_out: float = 0.2
    max_images: int = 5000
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)

    def validate(self) -> None:
        if self.input not in ("tokens", "pixels"):
            raise ConfigError("input", f"expected tokens or pixels, got {self.input!r}")
        require_at_least(self, 1, "epochs", "batch_size")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 < self.held_out < 1:
            raise ConfigError("held_out", f"expected a fraction in (0, 1), got {self.held_out}")
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 0:
            raise ConfigError("max_images", f"expected an integer >= 0 (0: every real image), got {self.max_images!r}")


@dataclass
class EvalConfig:
    """How ``sgdm-ldm eval`` samples and measures a trained run.

    ``metrics``: ``fid``/``is``/``kid`` go through torch-fidelity's Inception
    (``inception_weights`` for offline use); ``fd`` is the Frechet distance in
    the feature space of an sgdm feature extractor, reported as ``fd_<name>``
    (never as FID); ``adherence`` is box IoU / mask mIoU of the self-annotation
    of generated images with the guiding layout, and for label and box guidance the
    fraction of images the store's k-means centroids assign to their guiding cluster
    (beside its chance level; stores that kept their centroids only).
    The feature extractor defaults to the annotation section's backbone. The
    reference set is ``reference_n`` images of the training data (unflipped), spread
    evenly over it (item i * len / reference_n; a class-ordered dataset keeps every class's share), read by
    ``data.num_workers`` DataLoader processes (torch-fidelity's own, up to 4, when it is above 0); its statistics are cached in ``cache_dir`` (default
    ``<run>/eval/cache``). Runs guided by ground-truth masks are also scored by a
    linear probe trained on the dataset's own masks (``probe``). ``feature_name``: the
    ``<name>`` of ``fd_<name>`` (default ``dino`` or the architecture), ``{dataset}`` in it
    standing for ``data.dataset`` (the quickstart's ``dino_{dataset}``: its encoder is pretrained
    on the run's own images). ``compile``: the
    UNet samples under ``torch.compile`` (:meth:`SelfGuidedPipeline.compile`; the
    first batch compiles, which pays off over thousands of samples).
    """

    n: int = 10000
    batch_size: int = 64
    sampler: Literal["ddim", "ddpm", "dpmpp_2m"] = "ddim"
    steps: int = 250
    eta: float = 0.0
    spacing: Optional[Spacing] = None  # None: the run's sampler.spacing with its sampler, else the sampler's default
    guidance_scale: float = 2.0
    sweep_scales: list[float] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=lambda: ["fid", "is", "kid", "fd", "adherence"])
    inception_weights: Optional[pathlib.Path] = None
    feature_backbone: Optional[str] = None
    feature_backbone_kwargs: dict = field(default_factory=dict)
    feature_weights: Optional[pathlib.Path] = None
    feature_name: Optional[str] = None
    reference_n: int = 50000
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    cache_dir: Optional[pathlib.Path] = None
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> None:
        check_seed("seed", self.seed)
        if self.n < 2:
            raise ConfigError("n", f"need at least 2 samples for a covariance, got {self.n}")
        require_at_least(self, 1, "batch_size")
        if self.n < self.batch_size:
            raise ConfigError("n", f"{self.n} samples is smaller than the batch size {self.batch_size}; lower batch_size or raise n")
        require_at_least(self, 1, "steps")
        check_eta(self.eta, self.sampler)
        if self.reference_n < 2:
            raise ConfigError("reference_n", f"need at least 2 reference images, got {self.reference_n}")
        require_at_least(self, 1, "kid_subsets")
        require_at_least(self, 2, "kid_subset_size")  # an unbiased MMD estimate needs two vectors a set
        if not self.metrics:
            raise ConfigError("metrics", "empty; choose from fid, is, kid, fd, adherence")
        if len(set(self.metrics)) != len(self.metrics):
            raise ConfigError("metrics", f"duplicates in {self.metrics}")
        if self.feature_name is not None:
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(self.feature_name) if f is not None}
            except ValueError as err:
                raise ConfigError("feature_name", f"{self.feature_name!r}: {err}") from None
            if not self.feature_name or fields - {"dataset"}:
                raise ConfigError("feature_name", f"{self.feature_name!r}: a name, in which {{dataset}} stands for "
                                                  "data.dataset (no other field)")
        check_device("device", self.device)
        check_kwargs("feature_backbone_kwargs", self.feature_backbone_kwargs)
        self.check_files(prefix="")

    def check_files(self, prefix: str = "eval.") -> None:
        """The weights files this evaluation's metrics read must exist (ConfigError naming ``<prefix><key>``):
        a file no metric reads is not checked (a run copied from another machine records its paths)."""
        used = {"inception_weights": bool({"fid", "is", "kid"} & set(self.metrics)), "feature_weights": "fd" in self.metrics}
        for name, needed in used.items():
            path = getattr(self, name)
            if needed and path is not None and not path.is_file():
                raise ConfigError(prefix + name, f"file {path} does not exist")
