"""Batching samples (dicts from :class:`sgdm.data.base.ImageDataset`) for a DataLoader."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

# per-sample values whose length varies: kept as lists, never stacked
RAGGED_KEYS = frozenset({"gt_boxes", "gt_box_labels"})


def collate_samples(samples: Sequence[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """Stack a list of sample dicts into a batch dict.

    ``None`` entries (bad files under ``on_bad_image: skip``) are dropped and
    counted in ``batch["num_skipped"]``; the batch is smaller, never padded with
    another image. Returns None when every sample was bad. Tensors are stacked
    (``image`` -> [B, 3, H, W], ``gt_mask`` -> [B, H, W], ``gt_multi_hot`` ->
    [B, K]); ints and bools become int64 / bool tensors [B]; strings stay
    lists; ``gt_boxes`` / ``gt_box_labels`` stay lists of [n_i, 4] / [n_i].
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    keys = list(kept[0])
    for i, sample in enumerate(kept[1:], 1):
        if list(sample) != keys:
            raise ValueError(f"collate_samples: sample {i} has keys {sorted(sample)}, sample 0 has {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in kept]
        if key in RAGGED_KEYS:
            batch[key] = values
        elif isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"collate_samples: {key!r} has different shapes in one batch: {sorted(shapes)}")
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[key] = values
    batch["num_skipped"] = len(samples) - len(kept)
    return batch
