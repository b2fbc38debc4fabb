"""LOST single-object discovery (Simeoni et al., BMVC 2021): the self-boxed f (paper Sec. 3.2).

On the last layer's keys ``k [h*w, D]`` of one image, with patch similarity
``A = k k^T``:

1. degree ``d_p = #{q : A_pq >= 0}``; the seed ``s = argmin_p d_p`` (the object
   covers fewer patches than the background, so its patches correlate
   positively with fewer others);
2. seed expansion: among the ``k_patches`` lowest-degree patches, keep
   ``S = {q : A_sq >= 0}``;
3. the mask ``m_p = [sum_{q in S} A_pq >= 0]``; the box is the bounding box of
   the 4-connected component of ``m`` that contains the seed.

Boxes are returned normalised xyxy in ``[0, 1]`` of the backbone input (patch
edges: a component spanning columns ``x0..x1`` gives ``x0/w .. (x1+1)/w``).

``center=True`` first subtracts the image's mean feature, ``k <- k - mean_p k_p``,
so ``A`` measures similarity relative to the image's average patch. The paper's
LOST uses raw DINO keys; features with a large component shared by all patches
(a small encoder trained briefly on one domain) make nearly every ``A_pq``
positive, and the degree no longer separates object from background.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["lost", "lost_batch", "lost_boxes", "lost_feature_flags", "lost_from_features"]


# affinities per block of lost_batch (float64): 128 MB, e.g. 436 images of a 14 x 14 grid, or one of 56 x 56;
# on the CPU at most 2 MB (cache-resident: one block of 64 images at 14 x 14 measured ~1.4x slower per image)
_AFFINITY_BLOCK_ELEMENTS = 1 << 24
_CPU_AFFINITY_BLOCK_ELEMENTS = 1 << 18


def _box(affinity: torch.Tensor, degree: torch.Tensor, h: int, w: int, k_patches: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Steps 1-3 of the module docstring from one image's affinity ``[h*w, h*w]`` and degree ``[h*w]`` (CPU)."""
    seed = int(degree.argmin())  # first minimum on ties, deterministic
    candidates = degree.argsort(stable=True)[: min(k_patches, h * w)]
    expanded = candidates[affinity[seed, candidates] >= 0]
    mask = (affinity[:, expanded].sum(1) >= 0).reshape(h, w).numpy()
    components, _ = ndimage.label(mask)  # 4-connectivity
    sr, sc = divmod(seed, w)
    rows, cols = np.nonzero(components == components[sr, sc])
    box = torch.tensor([cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h], dtype=torch.float32)
    return box, (sr, sc)


def _affinities(keys: torch.Tensor, center: bool) -> torch.Tensor:
    """``A = k k^T`` ``[B, h*w, h*w]`` float64 of keys ``[B, h, w, D]``, on their device."""
    k = keys.reshape(keys.shape[0], keys.shape[1] * keys.shape[2], -1).double()
    if center:
        k = k - k.mean(1, keepdim=True)
    return torch.bmm(k, k.transpose(1, 2))


def lost(keys: torch.Tensor, k_patches: int = 100, center: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """Box of one image from its keys ``[h, w, D]``: ``(box [4] float32 normalised xyxy, seed (row, col))``.

    ``k_patches``: how many lowest-degree patches the seed expansion considers (step 2 of the module
    docstring; LOST's 100); ``center``: subtract the image's mean key first (module docstring)."""
    if keys.dim() != 3:
        raise ValueError(f"lost: keys must be [h, w, D], got shape {tuple(keys.shape)}")
    h, w, _ = keys.shape
    affinity = _affinities(keys[None], center)[0]
    return _box(affinity.cpu(), (affinity >= 0).sum(1).cpu(), h, w, k_patches)


def lost_batch(keys: torch.Tensor, k_patches: int = 100, center: bool = False) -> torch.Tensor:
    """Boxes ``[B, 4]`` for keys ``[B, h, w, D]``. The affinities and degrees (the O((hw)^2 D) part) are
    computed a block of images at a time on the keys' device; only the seed expansion and the connected
    component run per image on the CPU."""
    if keys.dim() != 4:
        raise ValueError(f"lost_batch: keys must be [B, h, w, D], got shape {tuple(keys.shape)}")
    if keys.shape[0] == 0:
        return torch.zeros(0, 4)
    b, h, w, _ = keys.shape
    limit = _AFFINITY_BLOCK_ELEMENTS if keys.device.type != "cpu" else min(_AFFINITY_BLOCK_ELEMENTS, _CPU_AFFINITY_BLOCK_ELEMENTS)
    step = max(1, limit // (h * w) ** 2)
    boxes = []
    for start in range(0, b, step):
        affinity = _affinities(keys[start : start + step], center)
        degree = (affinity >= 0).sum(2).cpu()
        boxes += [_box(a, d, h, w, k_patches)[0] for a, d in zip(affinity.cpu(), degree)]
    return torch.stack(boxes)


def lost_feature_flags(cfg) -> dict[str, bool]:
    """The ``extract(keys=, patches=)`` flags that give LOST its features under ``cfg``
    (a :class:`~sgdm.annotation.config.LostConfig`)."""
    return {"keys": cfg.features == "keys", "patches": cfg.features == "tokens"}


def lost_from_features(feats, cfg) -> torch.Tensor:
    """Boxes ``[B, 4]`` from the :class:`~sgdm.annotation.features.Features` of a batch,
    extracted with at least :func:`lost_feature_flags` ``(cfg)``."""
    return lost_batch(feats.keys if cfg.features == "keys" else feats.patches, cfg.k_patches, cfg.center)


def lost_boxes(backbone, images: torch.Tensor, cfg, bf16=None) -> torch.Tensor:
    """Boxes ``[B, 4]`` of ``images [B, 3, H, W]`` in ``[-1, 1]`` with ``cfg`` (which features,
    centring, ``k_patches``): the layout-adherence metric's f, the same that ``annotate`` runs
    through :func:`lost_from_features`."""
    from sgdm.annotation.features import extract

    return lost_from_features(extract(backbone, images, **lost_feature_flags(cfg), bf16=bf16), cfg)
