"""Turn self-supervised (or ground-truth) guidance into the UNet's (cond, cond_map).

Per granularity (paper Sec. 3, K = ``GuidanceConfig.num_classes``):

* ``label`` (Eq. 7): cond = one-hot cluster id [B, K]; no map.
* ``box`` (Eq. 8): cond = one-hot cluster id [B, K]; cond_map = binary box mask [B, 1, H, W].
* ``mask`` (Eq. 9): cond_map = one-hot class map [B, K, H, W] (ignore label 255 -> all zeros);
  cond = its spatial max-pool, the multi-hot vector of present classes [B, K].

Annotations (``AnnotationStore.get``; ground truth too, which ``annotate`` writes into a store
of the same layout) describe the unflipped preprocessed image, so boxes and masks are mirrored
here for samples whose ``flipped`` flag is set. The null condition is zeros for both; see
:func:`drop_guidance`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from sgdm.models.config import GuidanceConfig

__all__ = [
    "IGNORE_INDEX",
    "condition_dims",
    "one_hot",
    "box_mask",
    "class_map_one_hot",
    "resize_class_map",
    "multi_hot",
    "condition_from_annotations",
    "drop_guidance",
    "null_condition",
]

IGNORE_INDEX = 255


def condition_dims(guidance: GuidanceConfig) -> tuple[int, int]:
    """(cond_dim, cond_channels) of the UNet for this guidance: none (0, 0), label (K, 0),
    box (K, 1), mask (K, K)."""
    k = guidance.num_classes
    return {"none": (0, 0), "label": (k, 0), "box": (k, 1), "mask": (k, k)}[guidance.kind]


def one_hot(cluster, num_classes: int, device=None) -> torch.Tensor:
    """Cluster ids (int, list or [B] tensor) -> one-hot float32 [B, K]."""
    ids = torch.as_tensor(cluster, device=device).reshape(-1)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"cluster: expected integer ids, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= num_classes)
    if bad.any():
        raise ValueError(f"cluster: id {int(ids[bad][0])} is outside [0, {num_classes}) (K={num_classes})")
    return F.one_hot(ids.long(), num_classes).float()


def _box_rows(boxes) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """All boxes as float32 [M, 4], the sample each belongs to [M] (ascending), B, and whether
    box i is sample i's only box (M = B)."""
    if isinstance(boxes, torch.Tensor) and boxes.dim() == 2:
        if boxes.shape[1] != 4:
            raise ValueError(f"boxes: expected [B, 4] normalized xyxy, got shape {tuple(boxes.shape)}")
        flat = boxes.float()
        return flat, torch.arange(len(flat), device=flat.device), len(flat), True
    items = [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
    if not items:
        return torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 0, True
    # from a Python list: repeat_interleave took ~12 ms here on a loaded 2-core CPU (0.02 ms this way)
    sample = torch.tensor([i for i, b in enumerate(items) for _ in range(len(b))], dtype=torch.int64,
                          device=items[0].device)
    return torch.cat(items), sample, len(items), all(len(b) == 1 for b in items)


def _covered(cells: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[M, n]: cells [j, j+1) (j = ``cells`` [n]) overlapping the intervals [lo, hi] ([M]); a zero-width
    interval keeps the cell holding lo."""
    n, lo, hi = cells.numel(), lo[:, None], hi[:, None]
    return ((cells + 1 > lo) & (cells < hi)) | (cells == torch.clamp(torch.floor(lo), max=n - 1))


def box_mask(boxes, height: int, width: int, flipped=None) -> torch.Tensor:
    """Binary masks [B, 1, H, W] of boxes given as normalized xyxy in [0, 1].

    ``boxes``: [B, 4] (one box per sample) or a list of [n_i, 4] (union of n_i boxes).
    A pixel is on when its cell [j, j+1) x [i, i+1) overlaps the box scaled to
    (W, H), so any box covers at least one pixel. ``flipped`` [B] bool mirrors the
    boxes horizontally first (x -> 1 - x). All boxes at once: row and column coverage
    [M, H] and [M, W] per box, their outer product, and the union per sample.
    """
    flat, sample, n, one_each = _box_rows(boxes)
    device = flat.device
    if flipped is not None:
        flip = torch.as_tensor(flipped, device=device).reshape(-1).bool()
        if flip.numel() != n:
            raise ValueError(f"flipped: expected {n} flags, got {flip.numel()}")
    x0, y0, x1, y1 = flat.unbind(1)
    bad = ~((flat >= 0) & (flat <= 1)).all(1) | (x1 < x0) | (y1 < y0)  # written so that NaN fails it
    if bad.any():
        i = int(sample[bad][0])
        raise ValueError(f"boxes[{i}]: expected normalized xyxy with 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1, "
                         f"got {flat[sample == i].tolist()}")
    if flipped is not None:
        f = flip[sample]
        x0, x1 = torch.where(f, 1 - x1, x0), torch.where(f, 1 - x0, x1)
    rows = _covered(torch.arange(height, dtype=torch.float32, device=device), y0 * height, y1 * height)
    cols = _covered(torch.arange(width, dtype=torch.float32, device=device), x0 * width, x1 * width)
    hit = rows.float()[:, :, None] * cols.float()[:, None, :]  # one pass over [M, H, W]: products of 0 / 1
    if one_each:  # no union to take
        return hit[:, None]
    union = torch.zeros(n, height, width, device=device).index_add_(0, sample, hit).clamp_(max=1)
    return union[:, None]


def class_map_one_hot(class_map: torch.Tensor, num_classes: int, size: tuple[int, int] | None = None,
                      flipped=None) -> torch.Tensor:
    """Class maps [B, H, W] (ids in [0, K) or 255 = ignore) -> one-hot float32 [B, K, h, w].

    Resized to ``size`` first (:func:`resize_class_map`: class ids are never blended);
    ignored pixels get all-zero channels. ``flipped`` [B] bool mirrors maps horizontally.
    """
    ids = _class_ids(class_map)
    if flipped is not None:
        flip = torch.as_tensor(flipped, device=ids.device).reshape(-1).bool()
        if flip.numel() != ids.shape[0]:
            raise ValueError(f"flipped: expected {ids.shape[0]} flags, got {flip.numel()}")
        ids = torch.where(flip[:, None, None], ids.flip(-1), ids)
    _check_class_ids(ids, num_classes)
    if size is not None:
        ids = resize_class_map(ids, size, num_classes)
    return _one_hot_maps(ids, num_classes)


def resize_class_map(ids: torch.Tensor, size, num_classes: int) -> torch.Tensor:
    """Class maps [B, H, W] (ids in [0, K) or 255) resized to ``size`` (h, w) without blending ids.

    Shrinking (h <= H and w <= W): each cell takes the class that covers most of its area (ties: the
    lowest id; ignored pixels do not vote; a cell of ignored pixels only stays ignored); nearest
    neighbour would take one corner pixel of each cell, shifting the map by up to a cell. Growing:
    the nearest pixel of the cell's centre (``nearest-exact``; equal to plain nearest for whole factors).
    """
    size = tuple(int(v) for v in size)
    if tuple(ids.shape[-2:]) == size:
        return ids
    if size[0] <= ids.shape[-2] and size[1] <= ids.shape[-1]:
        return _majority_cells(ids.long(), size, num_classes)
    return F.interpolate(ids[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()


def _cells_of(length: int, cells: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of ``length`` pixels along an axis, the first and (or -1) the second of the ``cells``
    pooling cells of ``adaptive_avg_pool`` that hold it: cell i spans [floor(i L / n), ceil((i + 1) L / n)),
    and shrinking makes neighbours overlap by one pixel at most."""
    i = torch.arange(cells, device=device)
    start, end = (i * length) // cells, ((i + 1) * length + cells - 1) // cells
    pixel = torch.arange(length, device=device)[:, None]
    inside = (pixel >= start) & (pixel < end)  # [L, n]
    first = inside.int().argmax(1)
    second = torch.where(inside.sum(1) > 1, first + 1, -1)
    return first, second


def _majority_cells(ids: torch.Tensor, size: tuple[int, int], num_classes: int) -> torch.Tensor:
    """The class covering most of each ``adaptive_avg_pool`` cell (ties: the lowest id; ignored pixels do
    not vote; all-ignored cells stay ignored), from per-cell class counts gathered by a scatter of the
    pixels: the same as the argmax of the pooled one-hot, without a [B, K, H, W] tensor (453 MB and
    seconds for 64 maps of 256 x 256 with K = 27)."""
    b, height, width = ids.shape
    h, w = size
    slots = num_classes + 1  # the last one collects ignored pixels
    label = torch.where(ids == IGNORE_INDEX, num_classes, ids).reshape(b, -1)
    counts = torch.zeros(b, h * w * slots, dtype=torch.int32, device=ids.device)
    rows, cols = _cells_of(height, h, ids.device), _cells_of(width, w, ids.device)
    for row in rows:
        for col in cols:
            cell = (row[:, None] * w + col[None, :]).reshape(-1)  # [H * W]; -1 where the pixel has no 2nd cell
            inside = ((row[:, None] >= 0) & (col[None, :] >= 0)).reshape(-1)
            if not bool(inside.any()):
                continue
            key = (cell[inside] * slots)[None] + label[:, inside]
            counts.scatter_add_(1, key, torch.ones_like(key, dtype=torch.int32))
    counts = counts.view(b, h, w, slots)[..., :num_classes]
    return torch.where(counts.sum(-1) > 0, counts.argmax(-1), IGNORE_INDEX)


def _one_hot_maps(ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 ids [B, H, W] -> float32 [B, K, H, W]; ignored pixels are all-zero."""
    valid = ids != IGNORE_INDEX
    hot = F.one_hot(torch.where(valid, ids, 0), num_classes).permute(0, 3, 1, 2).float()
    return hot * valid[:, None].float()


def _class_ids(class_map: torch.Tensor) -> torch.Tensor:
    """Class maps [H, W] or [B, H, W] as int64 [B, H, W] (integer maps only)."""
    if class_map.dim() == 2:
        class_map = class_map[None]
    if class_map.dim() != 3 or class_map.is_floating_point():
        raise ValueError(f"mask: expected an integer class map [B, H, W], got {class_map.dtype} "
                         f"{tuple(class_map.shape)}")
    return class_map.long()


def _check_class_ids(ids: torch.Tensor, num_classes: int) -> None:
    bad = (ids >= num_classes) & (ids != IGNORE_INDEX) | (ids < 0)
    if bad.any():
        raise ValueError(f"mask: class id {int(ids[bad][0])} is outside [0, {num_classes}) and not the ignore "
                         f"label {IGNORE_INDEX}")


def _present_classes(class_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``multi_hot(class_map_one_hot(class_map, K))`` of one map [H, W] ([1, K] float32, the same
    checks and values) by the annotation store's scatter of its ids instead of a [1, K, H, W]
    one-hot: at 256 x 256 and K = 12, ~25x faster."""
    from sgdm.annotation.store import multi_hot_from_masks

    ids = _class_ids(class_map)
    _check_class_ids(ids, num_classes)
    if ids.numel() == 0:  # no pixels: the one-hot path's error
        return multi_hot(class_map_one_hot(class_map, num_classes))
    return multi_hot_from_masks(ids, num_classes).to(torch.float32)


def multi_hot(mask_one_hot: torch.Tensor) -> torch.Tensor:
    """Spatial max-pool of a one-hot mask [B, K, H, W] -> multi-hot [B, K] of present classes (Eq. 9)."""
    if mask_one_hot.dim() != 4:
        raise ValueError(f"mask: expected [B, K, H, W], got shape {tuple(mask_one_hot.shape)}")
    return mask_one_hot.amax(dim=(2, 3))


def _stack_field(records: Sequence[Mapping], key: str) -> list:
    try:
        return [r[key] for r in records]
    except KeyError:
        raise ValueError(f"annotations: a record has no '{key}' field (needed for this guidance kind)") from None


def _mask_condition(class_maps: Sequence, k: int, size, flipped) -> tuple[torch.Tensor, torch.Tensor]:
    # Multi-hot from the full-resolution maps: small regions may vanish when resizing.
    cond = torch.cat([_present_classes(torch.as_tensor(m)[None], k) for m in class_maps])
    maps = torch.cat([class_map_one_hot(torch.as_tensor(m)[None], k, size=size,
                                        flipped=None if flipped is None else flipped[i:i + 1])
                      for i, m in enumerate(class_maps)])
    return cond, maps


def condition_from_annotations(guidance: GuidanceConfig, records: Sequence[Mapping], size: tuple[int, int],
                               flipped=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(cond, cond_map) from ``AnnotationStore.get`` records (one per sample).

    ``size`` (H, W) is the resolution of the returned map (e.g. the latent grid);
    ``flipped`` [B] bool says which samples were mirrored by the data pipeline.
    A record with the store's no-annotation marker (``cluster`` -1, see
    :mod:`sgdm.annotation.store`) gets the null condition: zeros in both, as
    guidance dropout gives (the sample is trained unconditionally).
    """
    from sgdm.annotation.store import NO_ANNOTATION

    k, kind = guidance.num_classes, guidance.kind
    if kind == "none":
        return None, None
    if kind == "mask":
        return _mask_condition(_stack_field(records, "mask"), k, size, flipped)
    clusters = [int(c) for c in _stack_field(records, "cluster")]  # Python ints: no device sync below
    annotated = [c != NO_ANNOTATION for c in clusters]
    cond = one_hot([c if a else 0 for c, a in zip(clusters, annotated)], k)
    keep = None if all(annotated) else torch.tensor(annotated, dtype=torch.float32)
    if keep is not None:
        cond = cond * keep[:, None]
    if kind == "label":
        return cond, None
    boxes = torch.stack([torch.as_tensor(b, dtype=torch.float32).reshape(4) for b in _stack_field(records, "box")])
    cond_map = box_mask(boxes, size[0], size[1], flipped=flipped)
    if keep is not None:  # the marker's box [0, 0, 0, 0] still covers a cell: zero the whole map
        cond_map = cond_map * keep.to(cond_map.device)[:, None, None, None]
    return cond, cond_map


def drop_guidance(cond: torch.Tensor | None, cond_map: torch.Tensor | None, p: float = 0.1,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Replace the guidance of each sample by the null condition (zeros) with probability p.

    k and k_s are dropped together, per sample, so the same network learns
    eps(x_t, null) for classifier-free guidance. Draws B uniforms from ``generator``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p}")
    ref = cond if cond is not None else cond_map
    if ref is None:
        return cond, cond_map
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keep = (torch.rand(ref.shape[0], generator=generator, device=gen_device) >= p).to(ref.device)
    if cond is not None:
        cond = cond * keep[:, None].to(cond.dtype)
    if cond_map is not None:
        cond_map = cond_map * keep[:, None, None, None].to(cond_map.dtype)
    return cond, cond_map


def null_condition(cond: torch.Tensor | None, cond_map: torch.Tensor | None):
    """The null condition matching (cond, cond_map): zeros of the same shapes (None stays None)."""
    return (None if cond is None else torch.zeros_like(cond),
            None if cond_map is None else torch.zeros_like(cond_map))
