"""DINO multi-crop augmentation with kornia, every random draw from an explicit generator.

Kornia's augmentation modules draw from the global RNG, so the parameters are
drawn here (from the caller's ``torch.Generator``) and applied with kornia's
functional ops: random resized crops (``crop_and_resize``), horizontal flips,
colour jitter (brightness, contrast, saturation, hue), greyscale and Gaussian
blur (Caron et al. 2021, Sec. 3 and App. D).

Colour jitter, in the fixed order brightness, contrast, saturation, hue, has two
styles (``color_jitter_style``):

* ``dino``: torchvision's ``ColorJitter`` as DINO uses it: brightness scales the
  intensities by ``b``, contrast blends with the mean grey level, saturation with
  the grey image;
* ``additive`` (the default, sgdm's original): kornia's plain ops: brightness adds
  ``b - 1`` to every pixel, "contrast" multiplies the intensities by ``c`` (a
  second brightness change; the contrast itself never changes), saturation scales
  the HSV saturation. Far stronger on dark images: at strength 0.4, 5% of the
  views of an image of mean grey 0.29 keep under 5% of its brightness (``dino``:
  brightness and contrast ratios 0.65-1.37). The quickstart's short ``shapes``
  recipe is tuned with it (its NMI at 800 steps: 0.130 / 0.098 for seeds 0 / 1,
  0.076 / 0.079 with ``dino`` at the same settings).

Blur and solarization follow ``view_recipe``:

* ``shared`` (the default, sgdm's original): every view is blurred with probability ``blur_prob`` (a 3-tap
  kernel, sigma 0.1-1.0 px, so cut at 1 px) and solarized with ``solarize_prob``;
* ``dino``: DINO's asymmetric views (DataAugmentationDINO in main_dino.py): global view 1 is always blurred and
  never solarized, global view 2 blurred with p 0.1 and solarized with p 0.2, local crops blurred with p 0.5;
  sigma 0.1-2.0 px (PIL's GaussianBlur radius, its standard deviation) with a kernel to +-3 sigma of the largest.
  Sigma is in pixels of the crop, as in DINO (224 px global, 96 px local crops): on small images it blurs
  relatively more.
"""
from __future__ import annotations

import math

import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness,
    adjust_brightness_accumulative,
    adjust_contrast,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation,
    adjust_saturation_with_gray_subtraction,
)
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import crop_and_resize

from sgdm.features_pretrain.config import PretrainConfig

__all__ = ["random_resized_crop", "photometric", "multi_crop", "crop_sides", "view_probabilities"]

# (blur_prob, solarize_prob) of DINO's global views 1 and 2 and of its local crops (DataAugmentationDINO).
DINO_GLOBAL_VIEWS = ((1.0, 0.0), (0.1, 0.2))
DINO_LOCAL_VIEWS = (0.5, 0.0)
# Blur sigma range in pixels, and the kernel's half-width in sigmas of its largest (None: sgdm's fixed 3 taps).
_BLUR = {"shared": ((0.1, 1.0), None), "dino": ((0.1, 2.0), 3)}


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (hi - lo) + lo


def random_resized_crop(
    images: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator | None,
    max_rotation: float = 0.0,
) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` (aspect ratio in [3/4, 4/3]), rotated by a random
    angle in [-max_rotation, max_rotation] degrees, and resize it to ``size``.

    images: [B, C, H, W] -> [B, C, size, size]; a random half is flipped horizontally. A rotated
    crop that would leave the image is shrunk until its corners fit, so no padding enters a view.
    """
    b, _, h, w = images.shape
    area = _uniform(b, *scale, generator) * h * w
    log_ratio = _uniform(b, math.log(3 / 4), math.log(4 / 3), generator)
    ratio = log_ratio.exp()
    cw = (area * ratio).sqrt().clamp(1, w)
    ch = (area / ratio).sqrt().clamp(1, h)
    theta = _uniform(b, -max_rotation, max_rotation, generator) * (math.pi / 180)
    cos, sin = theta.cos(), theta.sin()
    ex, ey = cw * cos.abs() + ch * sin.abs(), cw * sin.abs() + ch * cos.abs()  # extent of the rotated box
    shrink = torch.minimum(torch.ones(b), torch.minimum(w / ex, h / ey))
    cw, ch, ex, ey = cw * shrink, ch * shrink, ex * shrink, ey * shrink
    cx = ex / 2 + torch.rand(b, generator=generator) * (w - ex)
    cy = ey / 2 + torch.rand(b, generator=generator) * (h - ey)
    flip = torch.rand(b, generator=generator) < 0.5
    # corners (top-left, top-right, bottom-right, bottom-left) in pixel-centre coordinates, [0, w - 1]
    hx, hy = (cw - 1) / 2, (ch - 1) / 2
    sx = torch.stack([-hx, hx, hx, -hx], -1) * torch.where(flip, -1.0, 1.0)[:, None]  # mirrored crop
    sy = torch.stack([-hy, -hy, hy, hy], -1)
    px = cx[:, None] - 0.5 + cos[:, None] * sx - sin[:, None] * sy
    py = cy[:, None] - 0.5 + sin[:, None] * sx + cos[:, None] * sy
    boxes = torch.stack([px, py], -1).to(images)
    return crop_and_resize(images, boxes, (size, size), align_corners=True)


def _blur_kernel(cfg: PretrainConfig, height: int, width: int) -> int:
    """Odd kernel side of ``cfg.view_recipe``'s blur: 3, or to +-3 sigma of the largest sigma, at most
    ``2 * side - 1`` (reflect padding needs a pad below the image side)."""
    (_, sigma_max), reach = _BLUR[cfg.view_recipe]
    if reach is None:
        return 3
    return min(2 * math.ceil(reach * sigma_max) + 1, 2 * min(height, width) - 1)


def photometric(images: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator | None,
                blur_prob: float | None = None, solarize_prob: float | None = None) -> torch.Tensor:
    """Colour jitter (p=0.8), greyscale, blur and solarization on images in [0, 1], [B, 3, H, W].

    ``blur_prob`` / ``solarize_prob``: this view's probabilities (:func:`view_probabilities`); None: ``cfg``'s."""
    b = images.shape[0]
    blur_prob = cfg.blur_prob if blur_prob is None else blur_prob
    solarize_prob = cfg.solarize_prob if solarize_prob is None else solarize_prob
    s = cfg.color_jitter
    if s > 0:
        apply = (torch.rand(b, generator=generator) < 0.8).to(images)
        one = torch.ones(b)
        bright = torch.lerp(one, _uniform(b, 1 - s, 1 + s, generator), apply.cpu()).to(images)
        contrast = torch.lerp(one, _uniform(b, 1 - s, 1 + s, generator), apply.cpu()).to(images)
        sat = torch.lerp(one, _uniform(b, 1 - s, 1 + s, generator), apply.cpu()).to(images)
        hue_max = s / 4 if cfg.hue_jitter is None else cfg.hue_jitter
        hue = (_uniform(b, -hue_max, hue_max, generator) * apply.cpu() * 2 * math.pi).to(images)
        if cfg.color_jitter_style == "dino":
            images = adjust_brightness_accumulative(images, bright).clamp(0, 1)  # x * b
            images = adjust_contrast_with_mean_subtraction(images, contrast)  # mean + c (x - mean), clamped
            images = adjust_saturation_with_gray_subtraction(images, sat)  # grey + s (x - grey), clamped
        else:
            images = adjust_brightness(images, bright - 1).clamp(0, 1)  # x + b - 1
            images = adjust_contrast(images, contrast).clamp(0, 1)  # x * c
            images = adjust_saturation(images, sat).clamp(0, 1)  # HSV saturation * s
        images = adjust_hue(images, hue).clamp(0, 1)
    if cfg.grayscale_prob > 0:
        grey = (torch.rand(b, generator=generator) < cfg.grayscale_prob).to(images.device).view(b, 1, 1, 1)
        images = torch.where(grey, rgb_to_grayscale(images).expand_as(images), images)
    if blur_prob > 0:
        blur = (torch.rand(b, generator=generator) < blur_prob).to(images.device).view(b, 1, 1, 1)
        sigma = _uniform(b, *_BLUR[cfg.view_recipe][0], generator).to(images).unsqueeze(1).repeat(1, 2)
        images = torch.where(blur, gaussian_blur2d(images, _blur_kernel(cfg, *images.shape[-2:]), sigma), images)
    if solarize_prob > 0:  # BYOL/DINO: invert the intensities above 0.5
        sol = (torch.rand(b, generator=generator) < solarize_prob).to(images.device).view(b, 1, 1, 1)
        images = torch.where(sol & (images >= 0.5), 1 - images, images)
    return images


def crop_sides(size: int, cfg: PretrainConfig) -> tuple[int, int]:
    """(global, local) crop side in pixels for images of side ``size``: ``size`` and
    ``max(4, round(size * local_crop_fraction))``."""
    return size, max(4, round(size * cfg.local_crop_fraction))


def view_probabilities(cfg: PretrainConfig) -> tuple[list[tuple[float, float]], tuple[float, float]]:
    """(blur_prob, solarize_prob) of each global view, and of the local views, under ``cfg.view_recipe``."""
    if cfg.view_recipe == "dino":
        return list(DINO_GLOBAL_VIEWS), DINO_LOCAL_VIEWS
    return [(cfg.blur_prob, cfg.solarize_prob)] * cfg.global_crops, (cfg.blur_prob, cfg.solarize_prob)


def multi_crop(
    images: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(global crops, local crops) of ``images`` in [-1, 1], [B, 3, H, W]; crops are in [-1, 1].

    Global crops keep the input size H (so the backbone sees its native
    resolution); local crops have side ``round(H * local_crop_fraction)``.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected [B, 3, H, W], got {tuple(images.shape)}")
    x = (images + 1) / 2
    size, local_size = crop_sides(images.shape[-1], cfg)

    global_probs, local_probs = view_probabilities(cfg)

    def view(side: int, scale: tuple[float, float], probs: tuple[float, float]) -> torch.Tensor:
        crops = random_resized_crop(x, side, scale, generator, cfg.max_rotation)
        return photometric(crops, cfg, generator, *probs) * 2 - 1

    global_views = [view(size, cfg.global_crop_scale, probs) for probs in global_probs]
    local_views = [view(local_size, cfg.local_crop_scale, local_probs) for _ in range(cfg.local_crops)]
    return global_views, local_views
