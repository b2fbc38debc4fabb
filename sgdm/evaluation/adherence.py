"""Adherence: does a generated image follow the cluster, box or mask that guided it?

The paper's self-annotation function f (LOST for boxes, STEGO-style
segmentation for masks, Sec. 3.2) is run on the generated images, and its
output is compared with the guiding layout: IoU with the guiding box (mean,
and the fraction with IoU >= 0.5 as in CorLoc), and mIoU / pixel accuracy with
the guiding mask (:func:`mask_scores`). How segment ids are matched depends on
where f comes from: the store's own f (the one that made the guiding masks)
names segments with the guidance's ids, so they are compared id for id
(``identity``); a segmenter fitted on the samples has arbitrary ids, matched one
to one to the guidance's by the Hungarian algorithm (``hungarian``, as in
unsupervised segmentation evaluation). The matching that maximises matched
pixels can only raise pixel accuracy, and mostly raises mIoU (not always: it
does not maximise mIoU), the floor of a model that ignores its guidance
included, so it is used only where ids carry no meaning; its scores are
reported beside every identity score (``mask_miou_hungarian``) so that numbers
from before this protocol stay comparable.

Cluster ids (label and box guidance) are scored with the store's own f, the
nearest k-means centroid of the sample's CLS feature (:func:`cluster_adherence`),
beside the best score a model that ignores its guidance could reach.

Ground-truth masks have meaningful class ids, which an unsupervised segmenter
fitted on the samples cannot name (mIoU ~0.05 on ``shapes`` whatever the
samples look like); :func:`mask_adherence_probe` scores them with a supervised
linear probe (:mod:`sgdm.evaluation.probe`) and plain per-class IoU instead.
"""
from __future__ import annotations

from typing import Literal

import torch

from sgdm.evaluation.feature_distance import FeatureSpace

__all__ = ["MaskMatching", "box_adherence", "cluster_adherence", "image_tokens", "mask_adherence",
           "mask_adherence_probe", "mask_scores", "patch_tokens", "store_precision"]

MaskMatching = Literal["identity", "hungarian"]


def store_precision(store, setting: str) -> str:
    """The ``annotation.precision`` setting adherence extracts a run's samples at, so that f meets features
    like those it was fitted on: the precision the self-annotated ``store``'s features were extracted at (its
    manifest's ``feature_precision``, ``bf16`` or ``fp32``), else the ``precision`` the store was made with
    (its ``params``), else ``setting`` (the run's ``annotation.precision``: a ground-truth store, or none).
    Resolved on the extractor's device by :func:`~sgdm.annotation.features.extraction_precision`."""
    if store is None or store.source != "self":
        return setting
    params = store.manifest.get("params") or {}
    return store.manifest.get("feature_precision") or params.get("precision") or setting


def _bf16(space: FeatureSpace, precision: str) -> bool:
    """Whether ``space`` extracts under bfloat16 autocast at the ``annotation.precision`` ``precision``."""
    from sgdm.annotation.features import extraction_precision

    return extraction_precision(precision, space.device) == "bf16"


@torch.no_grad()
def image_tokens(space: FeatureSpace, images: torch.Tensor, batch_size: int = 64,
                 precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """images [N, 3, H, W] in [-1, 1] -> the backbone's patch tokens [N, h', w', D] and CLS
    features [N, D] (float32, CPU), extracted once for every mask score of a sample set, at the
    ``annotation.precision`` ``precision`` (:func:`store_precision`)."""
    from sgdm.annotation.features import extract

    bf16 = _bf16(space, precision)
    feats = [extract(space.backbone, c.to(space.device), patches=True, bf16=bf16) for c in images.split(batch_size)]
    return torch.cat([f.patches.cpu() for f in feats]), torch.cat([f.cls.cpu() for f in feats])


def patch_tokens(space: FeatureSpace, images: torch.Tensor, batch_size: int = 64, precision: str = "auto") -> torch.Tensor:
    """images [N, 3, H, W] in [-1, 1] -> the backbone's patch tokens [N, h', w', D] (float32, CPU)."""
    return image_tokens(space, images, batch_size, precision)[0]


@torch.no_grad()
def box_adherence(space: FeatureSpace, images: torch.Tensor, boxes: torch.Tensor, lost_cfg=None, batch_size: int = 64,
                  precision: str = "auto") -> dict[str, float]:
    """images [N, 3, H, W] in [-1, 1]; boxes [N, 4] normalised xyxy -> ``box_iou``, ``box_hit50``.

    ``lost_cfg``: the annotation's :class:`~sgdm.annotation.config.LostConfig`
    (default: the paper's LOST), so the samples meet the f that made the boxes; ``precision``:
    the store's (:func:`store_precision`)."""
    from sgdm.annotation.config import LostConfig
    from sgdm.annotation.lost import lost_boxes
    from sgdm.annotation.metrics import box_iou

    if boxes.dim() != 2 or boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes: expected [{images.shape[0]}, 4] for {images.shape[0]} images, got {tuple(boxes.shape)}")
    lost_cfg = lost_cfg or LostConfig()
    bf16 = _bf16(space, precision)
    pred = torch.cat([lost_boxes(space.backbone, chunk.to(space.device), lost_cfg, bf16=bf16)
                      for chunk in images.split(batch_size)])
    iou = torch.stack([box_iou(p, g)[0, 0] for p, g in zip(pred, boxes)])
    return {"box_iou": float(iou.mean()), "box_hit50": float((iou >= 0.5).double().mean())}


@torch.no_grad()
def cluster_adherence(space: FeatureSpace, images: torch.Tensor, clusters: torch.Tensor, f,
                      batch_size: int = 64, precision: str = "auto") -> dict[str, float]:
    """images [N, 3, H, W] in [-1, 1]; the cluster ids [N] that guided them -> ``cluster_adherence``, the
    fraction of images whose cluster under the store's f (:class:`~sgdm.annotation.centroids.ClusterF`: the
    nearest k-means centroid of the image's prepared CLS feature) is the guiding one, and
    ``cluster_adherence_chance``, the frequency of the most common guiding cluster: the best a model that
    ignores its guidance can score on these conditions (it is 1/K only for balanced conditions).

    ``space`` must be the extractor the store's features came from
    (:func:`~sgdm.evaluation.feature_distance.annotation_space`), ``precision`` the store's
    (:func:`store_precision`)."""
    from sgdm.annotation.features import extract

    clusters = torch.as_tensor(clusters).long().cpu()
    if clusters.shape != (images.shape[0],):
        raise ValueError(f"clusters: expected [{images.shape[0]}] cluster ids for {images.shape[0]} images, "
                         f"got {tuple(clusters.shape)}")
    if clusters.numel() and (int(clusters.min()) < 0 or int(clusters.max()) >= f.num_classes):
        raise ValueError(f"clusters: ids must lie in [0, {f.num_classes}) (the store's K), got "
                         f"{int(clusters.min())}..{int(clusters.max())}")
    bf16 = _bf16(space, precision)
    cls = torch.cat([extract(space.backbone, c.to(space.device), patches=False, bf16=bf16).cls.cpu()
                     for c in images.split(batch_size)])
    hit = (f.assign(cls) == clusters).double()
    return {"cluster_adherence": float(hit.mean()),
            "cluster_adherence_chance": float(torch.bincount(clusters).max()) / len(clusters)}


def mask_scores(pred: torch.Tensor, masks: torch.Tensor, num_classes: int, matching: MaskMatching) -> dict:
    """Segmenter class maps ``pred`` [N, h, w] (ids in [0, num_classes)) against the guiding class
    maps ``masks`` [N, h, w] (255 = ignore), pixels pooled over the set.

    Returns ``mask_miou`` and ``mask_pixel_accuracy`` under ``matching``, ``mask_matching``
    (which one), and ``mask_miou_hungarian`` / ``mask_pixel_accuracy_hungarian``, the scores after
    Hungarian matching (equal to the first two when ``matching`` is ``hungarian``). mIoU is the
    mean over the classes present in ``masks`` or predicted in both protocols (a class predicted
    where the guidance has none scores 0; one neither present nor predicted is left out), see
    :func:`~sgdm.annotation.metrics.matched_miou`.

    ``identity``: ``pred``'s ids are the guidance's (the f that made the masks), compared as
    they are; ``hungarian``: ids are arbitrary, matched one to one to maximise matched pixels.
    """
    from sgdm.annotation.metrics import confusion, hungarian_miou
    from sgdm.evaluation.probe import class_iou

    if matching not in ("identity", "hungarian"):
        raise ValueError(f"matching: expected identity or hungarian, got {matching!r}")
    if pred.shape != masks.shape:
        raise ValueError(f"pred: class maps of shape {tuple(pred.shape)} for guiding masks of shape {tuple(masks.shape)}")
    valid = masks[masks != 255]
    top = int(valid.max()) if valid.numel() else -1
    if matching == "identity" and top >= num_classes:
        raise ValueError(f"masks: class id {top} is outside the segmenter's {num_classes} classes; id-for-id "
                         "matching needs the segmenter that made the guiding masks (the store's own)")
    hungarian = hungarian_miou(confusion(pred, masks.long(), num_classes, max(num_classes, top + 1)))
    scores = class_iou(pred, masks.long(), num_classes) if matching == "identity" else hungarian
    return {"mask_miou": scores["miou"], "mask_pixel_accuracy": scores["pixel_accuracy"], "mask_matching": matching,
            "mask_miou_hungarian": hungarian["miou"], "mask_pixel_accuracy_hungarian": hungarian["pixel_accuracy"]}


@torch.no_grad()
def mask_adherence(
    space: FeatureSpace,
    images: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int,
    stego_cfg,
    kmeans_cfg,
    generator: torch.Generator,
    batch_size: int = 64,
    segmenter=None,
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
    precision: str = "auto",
) -> dict:
    """images [N, 3, H, W]; guiding class maps ``masks`` [N, h, w] (255 = ignore) -> the
    :func:`mask_scores` of f's class maps of the images (``mask_miou``, ``mask_matching``, ...).

    ``segmenter``: the fitted f that made the guiding masks
    (:meth:`~sgdm.annotation.store.AnnotationStore.segmenter`), applied as it is; its ids are
    the guidance's, so they are scored id for id. Without one (ground-truth masks, or a store
    that did not keep f) a segmenter (``stego_cfg.method``: STEGO head or k-means on patches)
    is fitted on the generated set itself and its arbitrary ids are Hungarian-matched. Its
    [N, h', w'] maps are resized to the guiding masks' resolution (:func:`~sgdm.models.conditioning.resize_class_map`).
    ``tokens``: the images' :func:`image_tokens`, when the caller already has them; else they are
    extracted at ``precision`` (the store's, :func:`store_precision`).
    """
    from sgdm.annotation.stego import segment
    from sgdm.models.conditioning import resize_class_map

    if masks.dim() != 3 or masks.shape[0] != images.shape[0]:
        raise ValueError(f"masks: expected [{images.shape[0]}, h, w] class maps, got {tuple(masks.shape)}")
    patches, cls = tokens if tokens is not None else image_tokens(space, images, batch_size, precision)
    if segmenter is not None:
        num_classes = segmenter.num_classes
        pred = segmenter.assign(patches, batch_size, kmeans_cfg.chunk_elements, space.device, images=images)
    else:
        pred = segment(patches, cls, num_classes, stego_cfg, kmeans_cfg, generator, device=space.device, images=images)
    pred = resize_class_map(pred, masks.shape[-2:], num_classes)
    return mask_scores(pred, masks, num_classes, "hungarian" if segmenter is None else "identity")


@torch.no_grad()
def mask_adherence_probe(space: FeatureSpace, images: torch.Tensor, masks: torch.Tensor, probe,
                         batch_size: int = 64, patches: torch.Tensor | None = None,
                         precision: str = "auto") -> dict[str, float]:
    """images [N, 3, H, W]; ground-truth class maps ``masks`` [N, h, w] (255 = ignore) ->
    ``mask_miou_probe``, ``mask_pixel_accuracy_probe``, and ``mask_miou_probe_mismatched``: the
    same class maps scored against the guiding mask of the previous image (what a sample that
    ignores its layout but draws plausible images scores; NaN for a single image).

    ``probe``: a :class:`~sgdm.evaluation.probe.LinearProbe` on patch tokens or a
    :class:`~sgdm.evaluation.segmenter.PixelProbe` on the images, trained on real images of the
    same classes (:func:`~sgdm.evaluation.probe.fit_with_held_out`); its class maps are compared
    with the guiding masks id for id (:func:`~sgdm.evaluation.probe.class_iou`). ``patches``:
    the images' :func:`patch_tokens`, when the caller already has them (token probes only; else they
    are extracted at ``precision``, the one the probe's real-image tokens were extracted at)."""
    from sgdm.evaluation.probe import class_iou

    if masks.dim() != 3 or masks.shape[0] != images.shape[0]:
        raise ValueError(f"masks: expected [{images.shape[0]}, h, w] class maps, got {tuple(masks.shape)}")
    valid = masks[masks != 255]
    if valid.numel() and int(valid.max()) >= probe.num_classes:
        raise ValueError(f"masks: class id {int(valid.max())} is outside the probe's {probe.num_classes} classes")
    if probe.input == "pixels":
        inputs = images
    else:
        inputs = patches if patches is not None else patch_tokens(space, images, batch_size, precision)
    pred = probe.predict(inputs, masks.shape[-2:], batch_size)
    scores = class_iou(pred, masks.long(), probe.num_classes)
    # the floor of the scale: the same samples against another image's guiding mask (the
    # conditions are drawn independently, so a shift by one pairs each with an unrelated layout)
    floor = class_iou(pred, masks.long().roll(1, 0), probe.num_classes) if len(masks) > 1 else {"miou": float("nan")}
    return {"mask_miou_probe": scores["miou"], "mask_pixel_accuracy_probe": scores["pixel_accuracy"],
            "mask_miou_probe_mismatched": floor["miou"]}
