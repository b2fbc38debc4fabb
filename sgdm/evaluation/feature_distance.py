"""Frechet distance in the feature space of an sgdm feature extractor (offline-capable).

Any backbone :func:`sgdm.annotation.features.load_backbone` accepts (a timm
name, its kwargs and a local weights file, e.g. the encoder trained by
``sgdm-ldm pretrain-features``) embeds generated and reference images; the
Frechet distance between the Gaussians fitted to the two sets of CLS features
is reported as ``fd_<name>`` (e.g. ``fd_dino``). It is NOT FID: numbers are
comparable only within one feature extractor and its weights.
"""
from __future__ import annotations

import os
import pathlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch

from sgdm.evaluation.metrics import GaussianStats, frechet_distance, gaussian_stats

if TYPE_CHECKING:
    from sgdm.annotation.features import BackboneKeys

__all__ = ["FeatureSpace", "load_feature_space", "annotation_space", "embed", "reference_stats", "feature_distance"]


@dataclass
class FeatureSpace:
    """A loaded backbone plus the name its distance is reported under (``fd_<name>``)."""

    backbone: object  # sgdm.annotation.features.Backbone
    name: str
    device: torch.device

    @property
    def metric(self) -> str:
        return f"fd_{self.name}"


def _default_name(backbone: str) -> str:
    base = backbone.lower()
    name = "dino" if "dino" in base else base.split(".")[0]
    return re.sub(r"[^a-z0-9_]+", "_", name)


def load_feature_space(
    backbone: str,
    weights: str | os.PathLike | None = None,
    kwargs: dict | None = None,
    name: str | None = None,
    device: str | torch.device = "cpu",
    keys: "BackboneKeys | None" = None,
    image_size: int = 0,
) -> FeatureSpace:
    """Load ``backbone`` (timm name) with local ``weights``; ``name`` defaults to ``dino`` or the architecture.
    ``keys``: the settings a backbone error names (default: the annotation section's). ``image_size``: the
    input side (0: the backbone's own), as :func:`~sgdm.annotation.features.load_backbone` takes it."""
    from sgdm.annotation.features import ANNOTATION_KEYS, load_backbone

    if weights is not None and not pathlib.Path(weights).is_file():
        raise FileNotFoundError(f"feature extractor weights: file {weights} does not exist")
    loaded = load_backbone(backbone, weights=weights, kwargs=kwargs, image_size=image_size,
                           keys=keys or ANNOTATION_KEYS)
    device = torch.device(device)
    loaded.model.to(device)
    return FeatureSpace(loaded, name or _default_name(backbone), device)


def annotation_space(annotation, name: str | None = None, device: str | torch.device = "cpu") -> FeatureSpace:
    """The feature extractor of the ``annotation:`` section (an
    :class:`~sgdm.annotation.config.AnnotationConfig`): ``backbone``, ``backbone_kwargs``, ``weights`` and
    ``image_size``, the four settings ``sgdm-ldm annotate`` builds its extractor from, so that samples are
    resized and normalised (:func:`~sgdm.annotation.features.preprocess`) as the store's images were.
    :func:`~sgdm.evaluation.store_checks.check_store_extractor` compares the result with the store's record."""
    return load_feature_space(annotation.backbone, annotation.weights, dict(annotation.backbone_kwargs), name, device,
                              image_size=annotation.image_size)


@torch.no_grad()
def embed(space: FeatureSpace, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """CLS features [N, D] (float64, CPU) of image batches in [-1, 1], each [B, 3, H, W]."""
    from sgdm.annotation.features import extract

    out = [extract(space.backbone, b.to(space.device), patches=False).cls.double().cpu() for b in batches]
    if not out:
        raise ValueError("embed: no images")
    return torch.cat(out)


def reference_stats(space: FeatureSpace, batches: Iterable[torch.Tensor], cache: str | os.PathLike | None = None) -> GaussianStats:
    """Gaussian statistics of the reference images, cached in ``cache`` (a .pt file) when given.

    The cache file name should carry the dataset and weights identity; the
    caller (:mod:`sgdm.evaluation.evaluate`) builds it from both hashes.
    """
    if cache is not None and pathlib.Path(cache).is_file():
        data = torch.load(cache, map_location="cpu", weights_only=True)
        return GaussianStats(data["mu"], data["sigma"], int(data["count"]))
    stats = gaussian_stats(embed(space, batches), "reference features")
    if cache is not None:
        from sgdm.atomic import atomic_torch_save

        path = pathlib.Path(cache)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a temporary file of this process's own: two evaluations may compute the same statistics at once
        atomic_torch_save({"mu": stats.mu, "sigma": stats.sigma, "count": torch.tensor(stats.count)}, path)
    return stats


def feature_distance(space: FeatureSpace, generated: torch.Tensor, reference: GaussianStats, batch_size: int = 64) -> dict[str, float]:
    """``{"fd_<name>": d}`` between generated images [N, 3, H, W] in [-1, 1] and the reference statistics."""
    feats = embed(space, generated.split(batch_size))
    return {space.metric: frechet_distance(gaussian_stats(feats, "generated features"), reference)}
