"""A supervised pixel segmenter: the ground-truth-mask scorer when the encoder's tokens cannot name the classes.

Semantic image synthesis measures how well samples follow their label maps with
a segmentation network trained on the real images of the dataset (the mIoU of
SPADE-style evaluations). The linear probe of :mod:`sgdm.evaluation.probe` does
that on the annotation backbone's patch tokens; where those tokens do not hold
the classes (a briefly pretrained encoder on ``shapes`` carries an object's
colour but not its shape), this small U-Net trained on the pixels does. It sees
the images at the masks' resolution (rounded up to a multiple of 4 for its two
poolings; logits are resized back), so it is trained and applied where the masks
live, and it has the probe's interface: ``num_classes``, ``input`` and
``predict(inputs, size, batch_size)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sgdm.evaluation.config import SegmenterConfig

__all__ = ["UNetSegmenter", "PixelProbe", "check_training_data", "fit_segmenter"]

IGNORE = 255


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNetSegmenter(nn.Module):
    """Three levels (``width``, 2x, 4x channels; two 2x2 max-poolings), nearest-neighbour upsampling
    with skip connections, 1x1 classifier: ``[N, 3, H, W] -> [N, num_classes, H, W]``, H and W multiples of 4."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = _block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.dec2, self.dec1 = _block(6 * w, 2 * w), _block(3 * w, w)
        self.classify = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc1(x)
        b = self.enc2(F.max_pool2d(a, 2))
        c = self.enc3(F.max_pool2d(b, 2))
        b = self.dec2(torch.cat([b, F.interpolate(c, scale_factor=2.0, mode="nearest")], 1))
        a = self.dec1(torch.cat([a, F.interpolate(b, scale_factor=2.0, mode="nearest")], 1))
        return self.classify(a)


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected [N, 3, H, W] images in [-1, 1], got {tuple(images.shape)}")


def check_training_data(images: torch.Tensor, masks: torch.Tensor, num_classes: int) -> None:
    """Errors naming what is wrong with real ``images`` [N, 3, H, W] and class maps ``masks`` [N, h, w]."""
    _check_images(images)
    if masks.dim() != 3 or masks.shape[0] != images.shape[0]:
        raise ValueError(f"masks: expected [{images.shape[0]}, h, w] class maps (one per image), got {tuple(masks.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes: a segmenter needs at least 2 classes, got {num_classes}")
    valid = masks[masks != IGNORE]
    if not valid.numel():
        raise ValueError("masks: every pixel is 255 (ignore); nothing to train the segmenter on")
    if int(valid.min()) < 0 or int(valid.max()) >= num_classes:
        raise ValueError(f"masks: class ids must lie in [0, {num_classes}) or be {IGNORE} (ignore); "
                         f"found {int(valid.min())}..{int(valid.max())}")


def _work_size(size: Sequence[int]) -> tuple[int, int]:
    return tuple(4 * math.ceil(int(s) / 4) for s in size)


@dataclass
class PixelProbe:
    """A trained :class:`UNetSegmenter` (eval mode) with the linear probe's interface."""

    net: UNetSegmenter
    num_classes: int
    input: ClassVar[str] = "pixels"

    def logits(self, images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """images [N, 3, H, W] in [-1, 1] -> class logits [N, K, *size]."""
        _check_images(images)
        work = _work_size(size)
        x = images.float()
        if tuple(x.shape[-2:]) != work:
            x = F.interpolate(x, size=work, mode="bilinear", antialias=True, align_corners=False)
        out = self.net(x)
        if work != tuple(size):
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, size: Sequence[int], batch_size: int = 256) -> torch.Tensor:
        """images [N, 3, H, W] -> class maps [N, *size] int64."""
        self.net.eval()
        return torch.cat([self.logits(c, size).argmax(1) for c in images.split(batch_size)])


def fit_segmenter(images: torch.Tensor, masks: torch.Tensor, num_classes: int, generator: torch.Generator,
                  cfg: SegmenterConfig | None = None) -> PixelProbe:
    """Train a :class:`UNetSegmenter` on real ``images`` [N, 3, H, W] (in [-1, 1]) and their class maps
    ``masks`` [N, h, w] (values in [0, num_classes), 255 = ignore): cross-entropy at the masks'
    resolution, Adam with a one-cycle schedule. Initial weights and minibatch order come from ``generator``."""
    cfg = cfg or SegmenterConfig()
    check_training_data(images, masks, num_classes)
    from sgdm.training.rng import seeded_cpu_rng

    # module initialisation draws from the global RNG: keep it ours
    with seeded_cpu_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator))):
        net = UNetSegmenter(num_classes, cfg.width)
    probe = PixelProbe(net, num_classes)
    from sgdm.evaluation.probe import train_per_pixel

    batches = math.ceil(len(images) / cfg.batch_size)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, cfg.lr, total_steps=cfg.epochs * batches)
    net.train()
    train_per_pixel(probe.logits, images, masks, optimiser, cfg.epochs, cfg.batch_size, generator, schedule)
    net.eval().requires_grad_(False)
    return probe
