"""Patch features of a whole dataset, read by row from the feature shards on disk.

Mask annotation needs every image's patch tokens ``[h, w, D]``: for 118k
COCO images at ViT-B/16, 224 px that is 35 GB in float16, more than a host
should hold. :class:`ShardPatches` memory-maps the shard files that feature
extraction wrote (``STORE/work/features_*.safetensors``, key ``patches``) and
reads only the rows asked for, so STEGO training and the cluster probe hold
one batch at a time (the page cache does the rest).

A plain tensor ``[N, h, w, D]`` offers the same interface (``len``, ``shape``,
``x[index_tensor]``, ``x[start:end]``), so in-memory callers pass one directly.
"""
from __future__ import annotations

import bisect
import pathlib
from typing import Sequence

import torch
from safetensors import safe_open

__all__ = ["ShardPatches"]


class ShardPatches:
    """Rows ``patches [h, w, D]`` of the images of several safetensors shards, in shard order.

    ``source[index]`` (a LongTensor of global image indices) or ``source[start:end]``
    returns a ``[B, h, w, D]`` tensor in the stored dtype. Shards without a ``patches``
    key (every image unreadable) hold no rows."""

    def __init__(self, paths: Sequence[pathlib.Path], key: str = "patches"):
        self._slices, counts = [], []
        for path in paths:
            handle = safe_open(str(path), framework="pt")
            if key in handle.keys():
                self._slices.append(handle.get_slice(key))
                counts.append(self._slices[-1].get_shape()[0])
        if not self._slices:
            raise ValueError(f"ShardPatches: none of the {len(paths)} shard files holds {key!r} "
                             f"(first: {paths[0] if paths else 'none'}); were features extracted for masks?")
        shapes = {tuple(s.get_shape()[1:]) for s in self._slices}
        if len(shapes) != 1:
            raise ValueError(f"ShardPatches: shards disagree on the patch grid and width: {sorted(shapes)}")
        self._starts = [0]
        for count in counts:
            self._starts.append(self._starts[-1] + count)
        self.shape = torch.Size([self._starts[-1], *shapes.pop()])

    def __len__(self) -> int:
        return self.shape[0]

    def _range(self, start: int, end: int) -> list[torch.Tensor]:
        parts = []
        shard = bisect.bisect_right(self._starts, start) - 1
        while start < end:
            stop = min(end, self._starts[shard + 1])
            if stop > start:
                base = self._starts[shard]
                parts.append(self._slices[shard][start - base : stop - base])
            start, shard = stop, shard + 1
        return parts

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            start, end, step = index.indices(len(self))
            if step != 1:
                raise ValueError("ShardPatches: slices must have step 1")
            parts = self._range(start, end) if end > start else []
        else:
            index = torch.as_tensor(index).flatten().tolist()
            if index and not (-len(self) <= min(index) and max(index) < len(self)):
                raise IndexError(f"ShardPatches: index out of range for {len(self)} images")
            parts = [self._range(i % len(self), i % len(self) + 1)[0] for i in index]
        if not parts:
            return torch.empty(0, *self.shape[1:])
        return torch.cat(parts)
