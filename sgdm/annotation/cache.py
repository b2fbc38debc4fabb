"""Per-shard feature files under ``STORE/work``: the unit of resume.

Feature extraction is the slow part of annotation, so its output is written
shard by shard (atomically). A rerun skips every shard whose file exists, as
long as the fingerprint (backbone, weights hash, shard size, what is extracted,
and what determines the pixels: the data settings and the ids hash) is the one
the files were made with; otherwise it refuses rather than mixing features of
two models or two datasets. Each shard also records a stamp (size, mtime) of
its image files: a shard whose files changed since (an image replaced, or a
file that could not be read then repaired) is extracted again.

The fingerprint and every shard also record :data:`FEATURE_FORMAT`, the version
of what extraction writes. Shards of another format are extracted again, never
reused: a cache that differs from the fingerprint only in that version is
taken over (its fingerprint rewritten, its shards redone as they are reached),
since the user could do nothing with it but delete it.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from sgdm.annotation.store import StoreMismatchError, save_tensors_atomic
from sgdm.atomic import atomic_write_text

__all__ = ["FeatureCache", "file_stamps", "FEATURE_FORMAT"]

# Version of the cached tensors' meaning; raise it whenever extraction changes what a key holds.
# 2: `cls` of a ViT without a class token is the model's pooled feature (21a07ea); format 1
# (unrecorded) held its top-left patch token there.
FEATURE_FORMAT = 2
FORMAT_KEY = "feature_format"

Stamps = list  # [[id, size, mtime_ns] or [id, None, None] for a path that is not a file], one per image


def file_stamps(ids: Sequence[str], paths: Sequence[str]) -> Stamps:
    """What a rerun compares to tell whether the files behind a shard changed: one ``stat`` each."""
    stamps = []
    for image_id, path in zip(ids, paths):
        try:
            info = os.stat(path)
            stamps.append([image_id, info.st_size, info.st_mtime_ns])
        except (OSError, ValueError):  # missing (then maybe added), or no file at all (an LMDB key)
            stamps.append([image_id, None, None])
    return stamps


# fingerprint keys that are no config key, in the config's terms
_TERMS = {"extract": "extract is what annotation.granularity extracts (label: cls; box: cls+lost(annotation.lost's "
                     "k_patches, features, center); mask: cls+patches)",
          "input_size": "input_size is the backbone's (annotation.image_size, or its own)",
          "weights": "weights is annotation.weights' content (its sha256)",
          "ids_sha256": "ids_sha256 is the dataset's list of image ids"}


def _describe(changed: list[str], old: Mapping[str, Any], new: Optional[Mapping[str, Any]] = None) -> str:
    """``a, b differ; they were a=1`` plus which keys the old fingerprint predates, what this run extracts
    and what the keys that are no config key mean. A ``data.*`` key of
    :data:`~sgdm.data.config.ADDED_KEYS` it lacks was at its value there (left out of records)."""
    from sgdm.data.config import ADDED_KEYS

    implied = {f"data.{k}": v for k, v in ADDED_KEYS.items()}
    old = {**{k: implied[k] for k in changed if k not in old and k in implied}, **old}
    text = f"{', '.join(changed)} differ"
    was = [f"{k}={old[k]}" for k in changed if k in old and len(str(old[k])) <= 80]
    if was:
        text += f"; they were {', '.join(was)}"
    unrecorded = [k for k in changed if k not in old]
    if unrecorded:
        text += f"; made by an sgdm that did not record {', '.join(unrecorded)}"
    if "extract" in changed and "extract" in (new or {}):
        text += f"; this run extracts {new['extract']}"
    terms = [_TERMS[k] for k in changed if k in _TERMS]
    if terms:
        text += f": {'; '.join(terms)}"
    return text


class FeatureCache:
    """Feature shards under ``directory`` made with ``fingerprint`` (plus :data:`FEATURE_FORMAT`).

    ``upgraded_from``: the format of a cache taken over from an older sgdm (None otherwise)."""

    def __init__(self, directory: pathlib.Path, fingerprint: Mapping[str, Any]):
        self.directory = pathlib.Path(directory)
        self.fingerprint = json.loads(json.dumps({**fingerprint, FORMAT_KEY: FEATURE_FORMAT}))  # normalise tuples etc.
        self.upgraded_from = None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "fingerprint.json"
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise StoreMismatchError(f"{path} cannot be read as JSON ({err}); delete {self.directory} to "
                                         f"re-extract the features") from None
            changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            if changed == [FORMAT_KEY]:  # the same features by an older sgdm: redo them, here
                self.upgraded_from = old.get(FORMAT_KEY, 1)
                atomic_write_text(path, json.dumps(self.fingerprint, indent=1))
            elif changed:
                raise StoreMismatchError(
                    f"{self.directory} holds features made with other settings ({_describe(changed, old, self.fingerprint)}); "
                    f"delete {self.directory} to re-extract, or point annotation.store elsewhere"
                )
        else:
            atomic_write_text(path, json.dumps(self.fingerprint, indent=1))

    def path(self, shard: int) -> pathlib.Path:
        return self.directory / f"features_{shard:05d}.safetensors"

    def _metadata(self, shard: int) -> Optional[dict[str, str]]:
        """The shard's metadata; None where its file cannot be read as safetensors (torn)."""
        try:
            with safe_open(str(self.path(shard)), framework="pt") as handle:
                return handle.metadata() or {}
        except SafetensorError:
            return None

    def unreadable(self, shard: int) -> bool:
        """Whether the shard's file exists but cannot be read (cut short by a crash or a copy): extracted again."""
        return self.path(shard).is_file() and self._metadata(shard) is None

    def outdated(self, shard: int) -> bool:
        """Whether the shard exists but was written in another feature format (an older sgdm's)."""
        metadata = self._metadata(shard) if self.path(shard).is_file() else None
        return metadata is not None and metadata.get(FORMAT_KEY) != str(FEATURE_FORMAT)

    def done(self, shard: int, stamps: Optional[Stamps] = None) -> bool:
        """Whether the shard's features exist, readable, in this format and, given ``stamps``, were made
        from those files."""
        return (self.path(shard).is_file() and not self.unreadable(shard) and not self.outdated(shard)
                and (stamps is None or self.changed(shard, stamps) is None))

    def changed(self, shard: int, stamps: Stamps) -> Optional[str]:
        """The id of the first image whose file differs from its stamp in the saved shard, or None."""
        recorded = json.loads((self._metadata(shard) or {}).get("files", "null"))
        fresh = json.loads(json.dumps(stamps))  # as the metadata holds them
        if recorded is None or len(recorded) != len(fresh):  # cannot compare: count it as changed
            return fresh[0][0]
        return next((new[0] for was, new in zip(recorded, fresh) if was != new), None)

    def precision(self, shard: int) -> Optional[str]:
        """The precision the shard's features were computed at (``bf16`` / ``fp32``), or None (not recorded:
        an older sgdm's shard, or none at all)."""
        metadata = self._metadata(shard) if self.path(shard).is_file() else None
        return (metadata or {}).get("precision")

    def save(self, shard: int, tensors: Mapping[str, torch.Tensor], stamps: Optional[Stamps] = None,
             precision: Optional[str] = None) -> None:
        """Write the shard; its format, ``stamps`` (of its files, taken before they were read) and the
        ``precision`` its features were computed at go into its metadata."""
        metadata = {FORMAT_KEY: str(FEATURE_FORMAT)}
        if stamps is not None:
            metadata["files"] = json.dumps(stamps)
        if precision is not None:
            metadata["precision"] = precision
        save_tensors_atomic(self.path(shard), tensors, metadata)

    def load(self, shard: int, keys: Optional[Iterable[str]] = None, exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """The shard's tensors: all of them, or only ``keys`` (those present), minus ``exclude``
        (e.g. the patch features, which :class:`~sgdm.annotation.patches.ShardPatches` reads by row)."""
        if keys is None and not exclude:
            return load_file(str(self.path(shard)))
        with safe_open(str(self.path(shard)), framework="pt") as handle:
            wanted = [k for k in handle.keys() if (keys is None or k in keys) and k not in exclude]
            return {k: handle.get_tensor(k) for k in wanted}
