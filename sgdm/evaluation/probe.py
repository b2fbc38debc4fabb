"""A supervised linear probe: the layout-adherence segmenter for labelled (ground-truth) masks.

For a run guided by ground-truth masks the class ids mean something (shape and
colour on ``shapes``, VOC classes, ...), so the samples are scored by a
segmenter that names those classes: a linear classifier on the frozen
annotation backbone's patch tokens, trained on the dataset's own real images
and their ground-truth masks (the usual linear-probe protocol of DINO / STEGO
segmentation evaluation). Patch logits ``[N, K, h', w']`` are upsampled
bilinearly to the mask resolution before the cross-entropy (ignore 255) and
the argmax, so the probe is trained and applied at the masks' own resolution.

Scores are plain per-class IoU (no Hungarian matching: predicted id k is class
k), averaged over the classes present in the ground truth of the whole set or
predicted (a class predicted where the truth has none scores 0),
and pixel accuracy. The probe's score on held-out real images is the ceiling
for the samples' score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sgdm.evaluation.config import ProbeConfig

__all__ = ["ProbeConfig", "LinearProbe", "fit_probe", "train_per_pixel", "class_iou", "real_probe_data", "fit_with_held_out"]

IGNORE = 255


@dataclass
class LinearProbe:
    """Per-patch softmax regression: logits = ((x - mean) / std) @ weight + bias.

    ``weight`` [D, K], ``bias`` [K], ``mean``/``std`` [D] (standardisation of the training tokens)."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    input: ClassVar[str] = "tokens"  # what predict() takes: patch tokens (a PixelProbe takes images)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, patches: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """patches [N, h', w', D] -> class logits [N, K, *size] (bilinear upsampling of the patch logits)."""
        if patches.dim() != 4 or patches.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"patches: expected [N, h', w', {self.weight.shape[0]}], got {tuple(patches.shape)}")
        x = (patches.float() - self.mean) / self.std
        out = (x @ self.weight + self.bias).permute(0, 3, 1, 2)
        return F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(self, patches: torch.Tensor, size: Sequence[int], batch_size: int = 256) -> torch.Tensor:
        """patches [N, h', w', D] -> class maps [N, *size] int64."""
        return torch.cat([self.logits(c, size).argmax(1) for c in patches.split(batch_size)])


def _check_masks(patches: torch.Tensor, masks: torch.Tensor, num_classes: int, name: str = "masks") -> None:
    if patches.dim() != 4:
        raise ValueError(f"patches: expected [N, h', w', D] patch tokens, got {tuple(patches.shape)}")
    if masks.dim() != 3 or masks.shape[0] != patches.shape[0]:
        raise ValueError(f"{name}: expected [{patches.shape[0]}, h, w] class maps (one per image), got {tuple(masks.shape)}")
    valid = masks[masks != IGNORE]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise ValueError(f"{name}: class ids must lie in [0, {num_classes}) or be {IGNORE} (ignore); "
                         f"found {int(valid.min())}..{int(valid.max())}")


def fit_probe(patches: torch.Tensor, masks: torch.Tensor, num_classes: int, generator: torch.Generator,
              cfg: ProbeConfig | None = None) -> LinearProbe:
    """Train a :class:`LinearProbe` on patch tokens ``patches`` [N, h', w', D] and class maps
    ``masks`` [N, h, w] (values in [0, num_classes), 255 = ignore): cross-entropy at the masks'
    resolution, zero-initialised weights, minibatch order drawn from ``generator``."""
    cfg = cfg or ProbeConfig()
    _check_masks(patches, masks, num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes: a probe needs at least 2 classes, got {num_classes}")
    if not bool((masks != IGNORE).any()):
        raise ValueError("masks: every pixel is 255 (ignore); nothing to train the probe on")
    patches = patches.float()
    flat = patches.reshape(-1, patches.shape[-1])
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    dim = patches.shape[-1]
    weight = torch.zeros(dim, num_classes, requires_grad=True)  # softmax regression is convex: zero init is fine
    bias = torch.zeros(num_classes, requires_grad=True)
    probe = LinearProbe(weight, bias, mean, std)
    optimiser = torch.optim.Adam([weight, bias], lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_per_pixel(probe.logits, patches, masks, optimiser, cfg.epochs, cfg.batch_size, generator)
    return LinearProbe(weight.detach(), bias.detach(), mean, std)


def train_per_pixel(logits, inputs: torch.Tensor, masks: torch.Tensor, optimiser, epochs: int, batch_size: int,
                    generator: torch.Generator, schedule=None) -> None:
    """``epochs`` passes over ``inputs`` in minibatches drawn from ``generator``: cross-entropy of
    ``logits(inputs[rows], size)`` against ``masks`` [N, h, w] at their resolution (255 ignored), one
    ``optimiser`` step (and ``schedule`` step) per minibatch."""
    targets = masks.long()
    size = tuple(masks.shape[-2:])
    with torch.enable_grad():
        for _ in range(epochs):
            for rows in torch.randperm(len(inputs), generator=generator).split(batch_size):
                loss = F.cross_entropy(logits(inputs[rows], size), targets[rows], ignore_index=IGNORE)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                if schedule is not None:
                    schedule.step()


def class_iou(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Per-class IoU of class maps ``pred`` against ``true`` (same shape, 255 in ``true`` ignored),
    pooled over all pixels of the set: ``miou`` (mean over classes present in ``true`` or predicted; see
    :func:`~sgdm.annotation.metrics.matched_miou`) and
    ``pixel_accuracy``. Ids are compared as they are (no matching)."""
    from sgdm.annotation.metrics import confusion, matched_miou

    ids = np.arange(num_classes)
    return matched_miou(confusion(pred, true, num_classes, num_classes), ids, ids)


def real_probe_data(dataset, store, max_images: int = 0,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images [M, 3, H, W] in [-1, 1] and their store masks [M, h, w]: the store's records
    joined to ``dataset`` items by image id (the ids annotation wrote, ``dataset.ids``).
    Ids of the store without a dataset item, and unreadable items, are left out; none left is an error.
    ``max_images`` > 0: a random subset of that many joined records (``generator``), in store order."""
    index = {image_id: i for i, image_id in enumerate(dataset.ids)}
    rows = [(image_id, index[image_id]) for image_id in store.ids if image_id in index]
    if 0 < max_images < len(rows):
        if generator is None:
            raise ValueError("real_probe_data: max_images needs a generator to draw the subset from")
        keep = torch.randperm(len(rows), generator=generator)[:max_images].sort().values
        rows = [rows[i] for i in keep.tolist()]
    if not rows:
        shown = ", ".join(repr(i) for i in list(store.ids)[:3])
        raise ValueError(f"annotation store {store.path}: none of its {len(store)} image ids (e.g. {shown}) is an image "
                         f"of the dataset ({len(dataset.ids)} images); the probe needs the real images the ground "
                         "truth belongs to (same data config as `sgdm-ldm annotate`)")
    images, masks = [], []
    for image_id, i in rows:
        item = dataset[i]
        if item is None:
            continue
        images.append(item["image"])
        masks.append(torch.as_tensor(store.get(image_id)["mask"]))
    if not images:
        raise ValueError(f"annotation store {store.path}: none of the dataset images of its ids could be read")
    return torch.stack(images), torch.stack(masks)


def fit_with_held_out(inputs: torch.Tensor, masks: torch.Tensor, num_classes: int, generator: torch.Generator,
                      cfg: ProbeConfig | None = None,
                      views: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None):
    """Fit the scorer ``cfg.input`` names on real images' ``inputs`` and masks [M, h, w], keeping a
    random ``cfg.held_out`` fraction (drawn from ``generator``) out; returns the scorer and its
    :func:`class_iou` on the held-out images. ``inputs``: patch tokens [M, h', w', D] for the linear
    probe (``tokens``), the images [M, 3, H, W] for the U-Net (``pixels``, :mod:`sgdm.evaluation.segmenter`).
    ``views``: name -> function of held-out row indices returning other inputs of those images
    (e.g. of their autoencoder reconstructions), so only the held-out images are transformed;
    each is scored too, as ``<name>_miou`` and ``<name>_pixel_accuracy``."""
    cfg = cfg or ProbeConfig()
    if cfg.input == "pixels":
        from sgdm.evaluation.segmenter import check_training_data, fit_segmenter

        check_training_data(inputs, masks, num_classes)

        def fit(x, y):
            return fit_segmenter(x, y, num_classes, generator, cfg.segmenter)
    else:
        _check_masks(inputs, masks, num_classes)

        def fit(x, y):
            return fit_probe(x, y, num_classes, generator, cfg)
    m = len(inputs)
    held = int(round(m * cfg.held_out))
    if held < 1 or held >= m:
        raise ValueError(f"probe: {m} real images cannot be split into training and held-out ({cfg.held_out:.0%}) parts")
    order = torch.randperm(m, generator=generator)
    test, train = order[:held], order[held:]
    probe = fit(inputs[train], masks[train])
    scores = class_iou(probe.predict(inputs[test], masks.shape[-2:], cfg.batch_size), masks[test].long(), num_classes)
    for name, view_of in (views or {}).items():
        view = view_of(test)
        if view.shape != inputs[test].shape:
            raise ValueError(f"views[{name!r}]: expected the shape of inputs {tuple(inputs[test].shape)} for the "
                             f"held-out rows, got {tuple(view.shape)}")
        pred = probe.predict(view, masks.shape[-2:], cfg.batch_size)
        scores.update({f"{name}_{k}": v for k, v in class_iou(pred, masks[test].long(), num_classes).items()})
    return probe, scores
