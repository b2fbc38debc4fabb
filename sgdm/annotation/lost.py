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


def lost(keys: torch.Tensor, k_patches: int = 100, center: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """Box of one image from its keys ``[h, w, D]``: ``(box [4] float32 normalised xyxy, seed (row, col))``.

    ``k_patches``: how many lowest-degree patches the seed expansion considers (step 2 of the module
    docstring; LOST's 100); ``center``: subtract the image's mean key first (module docstring)."""
    if keys.dim() != 3:
        raise ValueError(f"lost: keys must be [h, w, D], got shape {tuple(keys.shape)}")
    h, w, _ = keys.shape
    k = keys.reshape(h * w, -1).double()
    if center:
        k = k - k.mean(0)
    affinity = k @ k.t()
    degree = (affinity >= 0).sum(1)
    seed = int(degree.argmin())  # first minimum on ties, deterministic
    candidates = degree.argsort(stable=True)[: min(k_patches, h * w)]
    expanded = candidates[affinity[seed, candidates] >= 0]
    mask = (affinity[:, expanded].sum(1) >= 0).reshape(h, w).cpu().numpy()
    components, _ = ndimage.label(mask)  # 4-connectivity
    sr, sc = divmod(seed, w)
    rows, cols = np.nonzero(components == components[sr, sc])
    box = torch.tensor([cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h], dtype=torch.float32)
    return box, (sr, sc)


def lost_batch(keys: torch.Tensor, k_patches: int = 100, center: bool = False) -> torch.Tensor:
    """Boxes ``[B, 4]`` for keys ``[B, h, w, D]``."""
    if keys.dim() != 4:
        raise ValueError(f"lost_batch: keys must be [B, h, w, D], got shape {tuple(keys.shape)}")
    if keys.shape[0] == 0:
        return torch.zeros(0, 4)
    return torch.stack([lost(k, k_patches, center)[0] for k in keys])


def lost_feature_flags(cfg) -> dict[str, bool]:
    """The ``extract(keys=, patches=)`` flags that give LOST its features under ``cfg``
    (a :class:`~sgdm.annotation.config.LostConfig`)."""
    return {"keys": cfg.features == "keys", "patches": cfg.features == "tokens"}


def lost_from_features(feats, cfg) -> torch.Tensor:
    """Boxes ``[B, 4]`` from the :class:`~sgdm.annotation.features.Features` of a batch,
    extracted with at least :func:`lost_feature_flags` ``(cfg)``."""
    return lost_batch((feats.keys if cfg.features == "keys" else feats.patches).cpu(), cfg.k_patches, cfg.center)


def lost_boxes(backbone, images: torch.Tensor, cfg, bf16=None) -> torch.Tensor:
    """Boxes ``[B, 4]`` of ``images [B, 3, H, W]`` in ``[-1, 1]`` with ``cfg`` (which features,
    centring, ``k_patches``): the layout-adherence metric's f, the same that ``annotate`` runs
    through :func:`lost_from_features`."""
    from sgdm.annotation.features import extract

    return lost_from_features(extract(backbone, images, **lost_feature_flags(cfg), bf16=bf16), cfg)
