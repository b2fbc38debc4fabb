"""Typed configuration of the ``annotation:`` section (self-annotation, issue 7).

Light imports only: the experiment schema imports this module to validate a
YAML file without pulling in timm or scikit-learn.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Literal, Optional

from sgdm.config.core import ConfigError, check_device, check_kwargs, check_seed, require_at_least

Granularity = Literal["label", "box", "mask"]


@dataclasses.dataclass
class KMeansConfig:
    """Lloyd k-means on L2-normalised features (see :func:`sgdm.annotation.kmeans.kmeans`)."""

    max_iter: int = 100
    tol: float = 1e-4  # relative to the mean per-dimension variance, as scikit-learn
    init: Literal["k-means++", "random"] = "k-means++"
    # k-means++ on a random subset of this many points per cluster (0: all points): exact greedy
    # k-means++ costs O(N K D), this O(16 K^2 D), and Lloyd iterations repair the rest (measured:
    # inertia within ~0.7% of scikit-learn's at K = 100 and 1000; 32 doubled the init time for ~0.2%)
    init_points_per_cluster: int = 16
    batch_size: int = 0  # > 0: mini-batch k-means with batches of this size
    chunk_elements: int = 1 << 25  # rows x clusters of one distance block (memory bound)

    def validate(self) -> None:
        require_at_least(self, 1, "max_iter")
        if self.tol < 0:
            raise ConfigError("tol", f"must be >= 0, got {self.tol}")
        for name in ("init_points_per_cluster", "batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0 (0 disables it), got {getattr(self, name)}")
        require_at_least(self, 1, "chunk_elements")


@dataclasses.dataclass
class LostConfig:
    """LOST (Simeoni et al., 2021) on the last layer's attention keys.

    ``features: tokens`` runs it on the last layer's output patch tokens instead,
    and ``center`` subtracts each image's mean feature before the patch
    similarities. Both default to the paper's LOST (keys, uncentred); a small
    encoder trained briefly on one domain has keys with a large shared component,
    so that nearly every patch pair correlates positively and boxes swell (on the
    quickstart's ``shapes`` encoder: CorLoc 0.29 with keys, 0.45 with centred tokens).
    """

    k_patches: int = 100  # size of the low-degree candidate set used for seed expansion
    num_clusters: int = 100  # k-means clusters of the CLS features, the box's class id
    features: Literal["keys", "tokens"] = "keys"
    center: bool = False

    def validate(self) -> None:
        require_at_least(self, 1, "k_patches", "num_clusters")


@dataclasses.dataclass
class CRFConfig:
    """STEGO's dense-CRF refinement of the class maps (:func:`sgdm.annotation.crf.dense_crf`), opt-in.

    Each cell of the ``mask_size`` grid gets class probabilities from the cluster probe,
    ``p = softmax(-alpha |c - m_k|^2 / 2)`` over the centroids ``m_k`` of its unit code ``c``.
    STEGO's probe gives ``softmax(alpha cos(c, m_k))`` with ``alpha = 2``; since
    ``-|c - m|^2 / 2 = c.m - |m|^2 / 2 - 1/2``, ours equals it up to each centroid's length (our
    centroids are not renormalised, see :mod:`sgdm.annotation.stego`), and its argmax is the
    nearest centroid, the map without CRF. Then mean-field of the fully connected CRF on the image
    area-resized to the grid, and each cell's most probable class.

    Kernel widths are in pixels of the annotation image (STEGO's defaults, which run at the
    image's pixels) and scale with the grid (mask side / image side); ``bi_rgb_std`` is in 0-255
    colour units.

    ``normalization``: ``symmetric`` (default) divides each kernel's messages by its degrees, as
    pydensecrf (and so STEGO) does, so that a message is a weighted average of the neighbours' labels
    whatever the grid's size; ``none`` sums them raw, which on a 64x64 grid makes them hundreds of
    times the unary's range (a confident segment inside a larger region of its colour is erased).
    Stores and segmenters made before the key existed used ``none`` and keep it.

    Measured with ``normalization: none`` on the quickstart's shapes (2000 images of 32 px, patch
    k-means f, K=12, seed 0; mIoU against the ground truth): 32x32 masks 0.0763 without, 0.0896 with
    these defaults, 0.0914 with ``bi_rgb_std: 30``; 16x16 masks 0.0748 / 0.0849 (not yet measured
    with ``symmetric``). Off by default all the same:
    one small f on one toy set, and the cost is O((mask cells)^2) per image and iteration,
    exact (32x32: ~1M pairs, ~0.15 s an image on one loaded CPU thread, against ~1 ms without;
    the default 64x64 grid of 256-px images: ~3 s an image, ~100 CPU hours for COCO's 118k,
    and a 128 MB float64 kernel held per image).

    ``method``: ``exact`` sums the messages over every pair of cells (the reference);
    ``lattice`` approximates them in O(cells) on the permutohedral lattice, as pydensecrf does
    (:mod:`sgdm.annotation.permutohedral`): measured in ``benchmarks/RESULTS.md`` ("Permutohedral
    CRF"), not the default because its messages differ from the exact ones by a few to ~20 per cent.
    """

    enabled: bool = False
    iterations: int = 10
    pos_weight: float = 3.0
    pos_xy_std: float = 1.0
    bi_weight: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    alpha: float = 2.0  # temperature of the probe's class probabilities
    method: str = "exact"  # exact | lattice: the messages summed exactly, or on the permutohedral lattice
    # symmetric | none: messages normalised by the kernels' degrees (pydensecrf's default, STEGO's CRF),
    # or raw sums (segmenters made before this key; their messages grow with the grid's cell count)
    normalization: str = "symmetric"

    def validate(self) -> None:
        if self.method not in ("exact", "lattice"):
            raise ConfigError("method", f"must be 'exact' or 'lattice', got {self.method!r}")
        if self.normalization not in ("symmetric", "none"):
            raise ConfigError("normalization", f"must be 'symmetric' or 'none', got {self.normalization!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ConfigError("iterations", f"must be an integer >= 0, got {self.iterations!r}")
        for name in ("pos_weight", "bi_weight"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(name, f"must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("pos_xy_std", "bi_xy_std", "bi_rgb_std", "alpha"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(name, f"must be a finite number > 0, got {getattr(self, name)}")


@dataclasses.dataclass
class StegoConfig:
    """STEGO-style segmentation head trained on frozen patch features (Hamilton et al., 2022).

    ``method: kmeans`` is the non-parametric baseline (k-means on patch features).

    ``mask_size``: side of the stored class maps. As STEGO does before its cluster probe, the
    codes (the features for ``kmeans``) are upsampled bilinearly from the patch grid to
    ``mask_size x mask_size`` and each cell takes its nearest centroid, so boundaries run between
    patch centres instead of along patch edges; the probe itself is fitted at the patch grid.
    ``annotate`` clamps the side to [patch grid, image side]: 0 keeps the patch grid, and masks
    are never finer than the image. Default 64: 2x a 256-pixel image's f8 latent and 4x a
    ViT-B/16's 14-16 patch grid, 4 KB a mask; on the quickstart's shapes (32 px, 8x8 patches,
    patch k-means, seed 0) masks at 32 score mIoU 0.0763 against the ground truth, the patch
    grid's 0.0671.

    ``crf``: STEGO's dense-CRF refinement of the masks on their images (:class:`CRFConfig`, off).
    """

    method: Literal["stego", "kmeans"] = "stego"
    dim: int = 70  # code dimension of the head
    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-4
    knn: int = 7  # nearest neighbours (by CLS feature) an image is paired with
    feature_samples: int = 11  # random spatial samples per side of each correlation tensor (0: full grid)
    pos_intra_weight: float = 1.0
    pos_inter_weight: float = 0.67
    neg_inter_weight: float = 0.63
    pos_intra_shift: float = 0.18
    pos_inter_shift: float = 0.12
    neg_inter_shift: float = 0.46
    pointwise: bool = True  # centre feature correlations per query location (STEGO's default)
    mask_size: int = 64
    crf: CRFConfig = dataclasses.field(default_factory=CRFConfig)

    def validate(self) -> None:
        if not 0 <= self.mask_size <= 1024:
            raise ConfigError("mask_size", f"must be in [0, 1024] (0: the patch grid), got {self.mask_size}")
        for name in ("dim", "epochs", "batch_size", "knn"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.feature_samples < 0:
            raise ConfigError("feature_samples", f"must be >= 0, got {self.feature_samples}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")


@dataclasses.dataclass
class AnnotationConfig:
    """Where annotations live and how they are made.

    ``store`` is the annotation store directory written by ``sgdm-ldm annotate``
    and read by training. ``num_classes`` is K: clusters for ``label``, the
    number of segment classes for ``mask`` (27 COCO-Stuff, 21 VOC); ``box``
    uses ``lost.num_clusters`` for its cluster id. ``source: gt`` fills the
    store from the dataset's ground truth (the supervised twin).
    """

    store: pathlib.Path = pathlib.Path("annotations")
    granularity: Granularity = "label"
    source: Literal["self", "gt"] = "self"
    backbone: str = "vit_base_patch16_224.dino"
    backbone_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: Optional[pathlib.Path] = None  # local .pth/.safetensors; None: timm's hub (needs network)
    image_size: int = 0  # backbone input size; 0: the backbone's own
    num_classes: int = 100
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    shard_size: int = 1024  # images per shard (the unit of resume)
    seed: int = 0
    kmeans: KMeansConfig = dataclasses.field(default_factory=KMeansConfig)
    lost: LostConfig = dataclasses.field(default_factory=LostConfig)
    stego: StegoConfig = dataclasses.field(default_factory=StegoConfig)

    def validate(self) -> None:
        check_seed("seed", self.seed)
        for name in ("num_classes", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.num_classes > 255 and self.granularity == "mask":
            raise ConfigError("num_classes",
                              f"masks are stored as uint8 class maps: at most 255 classes, got {self.num_classes}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.image_size < 0:
            raise ConfigError("image_size", f"must be >= 0 (0: the backbone's own), got {self.image_size}")
        if not self.backbone:
            raise ConfigError("backbone", "must name a timm model, e.g. vit_base_patch16_224.dino")
        check_kwargs("backbone_kwargs", self.backbone_kwargs)
        check_device("device", self.device)
