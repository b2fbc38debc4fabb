"""The join from a training batch to the UNet's guidance: sample id -> annotation -> (cond, cond_map).

Both ``source: self`` and ``source: gt`` read the annotation store: the
annotation issue fills a ``gt`` store from the dataset's ground truth in the
same format, so one code path serves the paper's self-guided models and their
supervised twins, and latent caching (which keeps no ground-truth fields)
works for both. Annotations describe the unflipped image; the builders in
:mod:`sgdm.models.conditioning` mirror boxes and masks of flipped samples.
An image stored with the no-annotation marker (a ground-truth box store's image
with no box left after the crop) gets the null condition, like a dropped one.

Guidance dropout (paper Sec. 3, probability p) draws one uniform per sample of
the *global* micro-batch and keeps this rank's slice, so dropping is the same
on one device or many.
"""
from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import torch

from sgdm.models.conditioning import condition_from_annotations, drop_guidance
from sgdm.models.config import GuidanceConfig

__all__ = ["GuidanceLookup", "dropout_keep_mask", "apply_keep_mask"]


class GuidanceLookup:
    """Callable ``(ids, flipped [B] bool, size (h, w)) -> (cond, cond_map)`` backed by an annotation store.

    The store is opened on first use (so DataLoader workers and DDP ranks each
    open their own handle) and checked against the guidance config then.
    """

    def __init__(self, guidance: GuidanceConfig, store_path: Optional[pathlib.Path]):
        self.guidance, self.store_path = guidance, store_path
        self._store = None

    @property
    def enabled(self) -> bool:
        return self.guidance.kind != "none"

    def store(self):
        if self._store is None:
            from sgdm.annotation.store import AnnotationStore

            if self.store_path is None:
                raise ValueError("annotation.store: guidance needs an annotation store, none configured")
            self._store = AnnotationStore.open(self.store_path)
        return self._store

    def records(self, ids: Sequence[str]) -> list[dict]:
        store = self.store()
        try:
            return [store.get(i) for i in ids]
        except KeyError as err:  # the store's message names the store and the id
            raise KeyError(f"{err.args[0]}; the store does not match this dataset: re-run `sgdm-ldm annotate` "
                           f"with this config") from None

    def __call__(self, ids: Sequence[str], flipped: torch.Tensor, size: tuple[int, int]):
        if not self.enabled:
            return None, None
        return condition_from_annotations(self.guidance, self.records(ids), size, flipped=flipped)


def dropout_keep_mask(global_batch: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """[G] float, 1 = keep the guidance, 0 = null condition (drawn as in ``drop_guidance``)."""
    kept, _ = drop_guidance(torch.ones(global_batch, 1), None, p, generator)
    return kept[:, 0]


def apply_keep_mask(cond: Optional[torch.Tensor], cond_map: Optional[torch.Tensor], keep: torch.Tensor):
    """Zero (cond, cond_map) of the samples whose ``keep`` is 0 (both together, per sample)."""
    if cond is not None:
        cond = cond * keep.to(cond)[:, None]
    if cond_map is not None:
        cond_map = cond_map * keep.to(cond_map)[:, None, None, None]
    return cond, cond_map
