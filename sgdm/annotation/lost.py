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
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["lost", "lost_batch"]


def lost(keys: torch.Tensor, k_patches: int = 100) -> tuple[torch.Tensor, tuple[int, int]]:
    """Box of one image from its keys ``[h, w, D]``: ``(box [4] float32 normalised xyxy, seed (row, col))``."""
    if keys.dim() != 3:
        raise ValueError(f"lost: keys must be [h, w, D], got shape {tuple(keys.shape)}")
    h, w, _ = keys.shape
    k = keys.reshape(h * w, -1).double()
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


def lost_batch(keys: torch.Tensor, k_patches: int = 100) -> torch.Tensor:
    """Boxes ``[B, 4]`` for keys ``[B, h, w, D]``."""
    if keys.dim() != 4:
        raise ValueError(f"lost_batch: keys must be [B, h, w, D], got shape {tuple(keys.shape)}")
    if keys.shape[0] == 0:
        return torch.zeros(0, 4)
    return torch.stack([lost(k, k_patches)[0] for k in keys])
