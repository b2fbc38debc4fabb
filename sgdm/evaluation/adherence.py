"""Layout adherence: does a generated image follow the box or mask that guided it?

The paper's self-annotation function f (LOST for boxes, STEGO-style
segmentation for masks, Sec. 3.2) is run on the generated images, and its
output is compared with the guiding layout: IoU with the guiding box (mean,
and the fraction with IoU >= 0.5 as in CorLoc), and mIoU / pixel accuracy with
the guiding mask after Hungarian matching of segment ids (the segmenter's ids
are arbitrary, as in unsupervised segmentation evaluation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sgdm.evaluation.feature_distance import FeatureSpace

__all__ = ["box_adherence", "mask_adherence"]


@torch.no_grad()
def box_adherence(space: FeatureSpace, images: torch.Tensor, boxes: torch.Tensor, lost_cfg=None, batch_size: int = 64) -> dict[str, float]:
    """images [N, 3, H, W] in [-1, 1]; boxes [N, 4] normalised xyxy -> ``box_iou``, ``box_hit50``.

    ``lost_cfg``: the annotation's :class:`~sgdm.annotation.config.LostConfig`
    (default: the paper's LOST), so the samples meet the f that made the boxes."""
    from sgdm.annotation.config import LostConfig
    from sgdm.annotation.lost import lost_boxes
    from sgdm.annotation.metrics import box_iou

    if boxes.dim() != 2 or boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes: expected [{images.shape[0]}, 4] for {images.shape[0]} images, got {tuple(boxes.shape)}")
    lost_cfg = lost_cfg or LostConfig()
    pred = torch.cat([lost_boxes(space.backbone, chunk.to(space.device), lost_cfg) for chunk in images.split(batch_size)])
    iou = torch.stack([box_iou(p, g)[0, 0] for p, g in zip(pred, boxes)])
    return {"box_iou": float(iou.mean()), "box_hit50": float((iou >= 0.5).double().mean())}


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
) -> dict[str, float]:
    """images [N, 3, H, W]; guiding class maps ``masks`` [N, h, w] (255 = ignore) -> ``mask_miou``, ``mask_pixel_accuracy``.

    ``segmenter``: the fitted f that made the guiding masks
    (:meth:`~sgdm.annotation.store.AnnotationStore.segmenter`), applied as it is.
    Without one (ground-truth masks) a segmenter (``stego_cfg.method``: STEGO
    head or k-means on patches) is fitted on the generated set itself. Its
    [N, h', w'] maps are upsampled (nearest) to the guiding masks' resolution.
    """
    from sgdm.annotation.features import extract
    from sgdm.annotation.metrics import confusion, hungarian_miou
    from sgdm.annotation.stego import segment

    if masks.dim() != 3 or masks.shape[0] != images.shape[0]:
        raise ValueError(f"masks: expected [{images.shape[0]}, h, w] class maps, got {tuple(masks.shape)}")
    feats = [extract(space.backbone, c.to(space.device), patches=True) for c in images.split(batch_size)]
    patches = torch.cat([f.patches.cpu() for f in feats])
    cls = torch.cat([f.cls.cpu() for f in feats])
    if segmenter is not None:
        num_classes = segmenter.num_classes
        pred = segmenter.assign(patches, batch_size, kmeans_cfg.chunk_elements, space.device)
    else:
        pred = segment(patches, cls, num_classes, stego_cfg, kmeans_cfg, generator, device=space.device)
    pred = F.interpolate(pred[:, None].float(), size=masks.shape[-2:], mode="nearest")[:, 0].long()
    valid = masks[masks != 255]
    num_true = max(num_classes, int(valid.max()) + 1 if valid.numel() else 1)
    table = confusion(pred, masks.long(), num_classes, num_true)
    scores = hungarian_miou(table)
    return {"mask_miou": scores["miou"], "mask_pixel_accuracy": scores["pixel_accuracy"]}
