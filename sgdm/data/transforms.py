"""Latent-Diffusion preprocessing, applied to an image and its annotations together.

1. centre crop to the short side (side ``s = min(W, H)``, offset
   ``((W - s) // 2, (H - s) // 2)``),
2. antialiased bicubic resize to ``size x size`` (PIL filters downscales over
   the whole footprint, as LDM's LSUN loader does),
3. optional horizontal flip ``x -> size - x``.

Boxes are xyxy in pixel-edge coordinates (a box covering pixel columns 3..5
is ``x1=3, x2=6``); they are shifted, scaled, clipped to the crop and dropped
when nothing of them is left. Masks use nearest-neighbour resampling so class
ids never blend.

The flip is a pure function of ``(seed, epoch, index)`` (:func:`flip_coin`),
so a resumed run sees exactly the flips it would have seen, in any worker.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Crop:
    """Square crop ``[left, left + side) x [top, top + side)`` resized to ``size``."""

    left: int
    top: int
    side: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / self.side


def centre_crop(width: int, height: int, size: int) -> Crop:
    side = min(width, height)
    return Crop((width - side) // 2, (height - side) // 2, side, size)


def flip_coin(seed: int, epoch: int, index: int) -> bool:
    """Fair coin that depends only on ``(seed, epoch, index)`` (blake2b, not the global RNG)."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, epoch, index), digest_size=8).digest()
    return bool(digest[0] & 1)


def transform_image(image: Image.Image, crop: Crop, flipped: bool) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, size, size]`` in [-1, 1]."""
    box = (crop.left, crop.top, crop.left + crop.side, crop.top + crop.side)
    if crop.side == crop.size and image.size == (crop.side, crop.side):
        out = image
    else:
        out = image.resize((crop.size, crop.size), Image.BICUBIC, box=box)
    array = np.array(out, dtype=np.uint8)  # a writable copy: PIL's buffer is read-only
    if flipped:
        array = np.ascontiguousarray(array[:, ::-1])
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    return tensor.to(torch.float32).div_(127.5).sub_(1.0)


def transform_mask(mask: np.ndarray, crop: Crop, flipped: bool) -> torch.Tensor:
    """uint8 class map ``[H, W]`` (of the original image) -> int64 ``[size, size]``."""
    box = (crop.left, crop.top, crop.left + crop.side, crop.top + crop.side)
    pil = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), "L")
    if crop.side == crop.size and pil.size == (crop.side, crop.side):
        array = np.array(pil)
    else:
        array = np.array(pil.resize((crop.size, crop.size), Image.NEAREST, box=box))
    if flipped:
        array = np.ascontiguousarray(array[:, ::-1])
    return torch.from_numpy(array).to(torch.int64)


def transform_boxes(boxes: np.ndarray, crop: Crop, flipped: bool) -> tuple[torch.Tensor, np.ndarray]:
    """xyxy pixel boxes ``[n, 4]`` of the original image -> (float32 ``[m, 4]`` boxes of
    the output image, boolean ``[n]`` of which input boxes survived the crop)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    offset = np.array([crop.left, crop.top, crop.left, crop.top], dtype=np.float64)
    out = np.clip((boxes - offset) * crop.scale, 0.0, crop.size)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    out = out[keep]
    if flipped:
        out = np.stack([crop.size - out[:, 2], out[:, 1], crop.size - out[:, 0], out[:, 3]], axis=1)
    return torch.from_numpy(out.astype(np.float32)).reshape(-1, 4), keep
