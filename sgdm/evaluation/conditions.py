"""Sampling conditions for evaluation, drawn from the training annotations (as in the paper).

Each generated image gets the annotation of a training image drawn uniformly
with replacement from the store's annotated images (a box store's rows with the
no-annotation marker are never drawn): its cluster id (label guidance), its box and
cluster (box guidance) or its class map (mask guidance). The guiding layouts
are returned too, for the adherence metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["EvalConditions", "draw_conditions"]


@dataclass
class EvalConditions:
    """Per-image guidance: ``clusters`` [N] int64, ``boxes`` [N, 4] normalised xyxy, ``masks`` [N, h, w] uint8."""

    kind: str
    clusters: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None

    def slice(self, start: int, stop: int) -> "EvalConditions":
        """Images ``[start, stop)`` of these conditions (one process's share of an evaluation)."""
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return EvalConditions(self.kind, cut(self.clusters), cut(self.boxes), cut(self.masks))

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments of ``SelfGuidedPipeline.__call__`` for these conditions."""
        if self.kind == "label":
            return {"cluster": self.clusters.tolist()}
        if self.kind == "box":
            return {"cluster": self.clusters.tolist(), "box": self.boxes}
        if self.kind == "mask":
            return {"mask": self.masks.long()}
        return {}


def draw_conditions(kind: str, store_path, n: int, generator: torch.Generator) -> EvalConditions:
    """``n`` conditions of guidance ``kind`` (none|label|box|mask) from the annotation store."""
    if kind == "none":
        return EvalConditions("none")
    from sgdm.annotation.store import AnnotationStore

    store = AnnotationStore.open(store_path)
    if store.granularity != kind:
        raise ValueError(f"annotation store {store_path} holds {store.granularity!r} annotations, the model is {kind}-guided")
    if not store.ids:
        raise ValueError(f"annotation store {store_path} is empty")
    annotated = store.annotated().tolist()
    ids = [image_id for image_id, a in zip(store.ids, annotated) if a]
    if not ids:
        raise ValueError(f"annotation store {store_path}: none of its {len(annotated)} images is annotated "
                         f"(every row has the no-annotation marker), there is no guidance to draw")
    picks = torch.randint(len(ids), (n,), generator=generator).tolist()
    records = [store.get(ids[i]) for i in picks]
    clusters = torch.tensor([int(r["cluster"]) for r in records]) if kind in ("label", "box") else None
    boxes = torch.stack([torch.as_tensor(r["box"], dtype=torch.float32) for r in records]) if kind == "box" else None
    masks = torch.stack([torch.as_tensor(r["mask"], dtype=torch.uint8) for r in records]) if kind == "mask" else None
    return EvalConditions(kind, clusters, boxes, masks)
