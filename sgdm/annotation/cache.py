"""Per-shard feature files under ``STORE/work``: the unit of resume.

Feature extraction is the slow part of annotation, so its output is written
shard by shard (atomically). A rerun skips every shard whose file exists, as
long as the fingerprint (backbone, weights hash, dataset ids hash, shard size,
what is extracted) is the one the files were made with; otherwise it refuses
rather than mixing features of two models.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Iterable, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sgdm.annotation.store import StoreMismatchError, atomic_write_text, save_tensors_atomic

__all__ = ["FeatureCache"]


class FeatureCache:
    def __init__(self, directory: pathlib.Path, fingerprint: Mapping[str, Any]):
        self.directory = pathlib.Path(directory)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint)))  # normalise tuples etc.
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "fingerprint.json"
        if path.is_file():
            old = json.loads(path.read_text())
            changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            if changed:
                raise StoreMismatchError(
                    f"{self.directory} holds features made with other settings ({', '.join(changed)} differ); "
                    f"delete {self.directory} to re-extract, or point annotation.store elsewhere"
                )
        else:
            atomic_write_text(path, json.dumps(self.fingerprint, indent=1))

    def path(self, shard: int) -> pathlib.Path:
        return self.directory / f"features_{shard:05d}.safetensors"

    def done(self, shard: int) -> bool:
        return self.path(shard).is_file()

    def save(self, shard: int, tensors: Mapping[str, torch.Tensor]) -> None:
        save_tensors_atomic(self.path(shard), tensors)

    def load(self, shard: int, keys: Optional[Iterable[str]] = None, exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """The shard's tensors: all of them, or only ``keys`` (those present), minus ``exclude``
        (e.g. the patch features, which :class:`~sgdm.annotation.patches.ShardPatches` reads by row)."""
        if keys is None and not exclude:
            return load_file(str(self.path(shard)))
        with safe_open(str(self.path(shard)), framework="pt") as handle:
            wanted = [k for k in handle.keys() if (keys is None or k in keys) and k not in exclude]
            return {k: handle.get_tensor(k) for k in wanted}
