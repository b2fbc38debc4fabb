"""Atomic checkpoints: write to a temporary file, fsync, rename; find the newest valid one.

A checkpoint named ``step-XXXXXXXX.ckpt`` only ever appears through an atomic
``os.replace`` of a fully written and fsynced temporary file, so a process
killed mid-write leaves at most a ``.tmp`` leftover, never a partial
checkpoint under a real name. Leftovers are removed when the next run starts;
a file that still fails its zip CRC check (disk corruption) is skipped in
favour of the previous checkpoint.
"""
from __future__ import annotations

import os
import pathlib
import re
import zipfile
from typing import Any, Optional

from lightning_fabric.plugins import TorchCheckpointIO

# the atomic writes live in sgdm.atomic (light to import: the pipeline and the annotation store use them
# too); the names stay importable from here
from sgdm.atomic import TMP_SUFFIX, atomic_open, atomic_torch_save, atomic_write_text

__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "checkpoint_name", "list_checkpoints", "find_last_valid",
           "clean_leftovers", "prune_checkpoints", "is_valid_checkpoint", "atomic_open", "atomic_write_text"]

_NAME = re.compile(r"^step-(\d{8,})\.ckpt$")


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint of training step ``step``: ``step-00001234.ckpt`` (zero-padded,
    so names sort by step)."""
    return f"step-{step:08d}.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose ``save_checkpoint`` is :func:`atomic_torch_save`.

    While ``keep_failure`` is set, an OSError of the write (a full disk) is kept in ``failure`` instead of
    raised: under DDP only rank 0 writes and the others wait in Lightning's barrier after the write, which
    rank 0 must reach too before every process can learn of the failure (:class:`~sgdm.training.callbacks.
    StepCheckpoint`); raised there, it left them waiting until the process group's timeout."""

    def __init__(self):
        super().__init__()
        self.keep_failure = False
        self.failure: Optional[OSError] = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as err:
            if not self.keep_failure:
                raise
            self.failure = err


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, pathlib.Path]]:
    """[(step, path)] of the checkpoints in ``directory``, oldest first."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def is_valid_checkpoint(path: str | os.PathLike) -> bool:
    """A complete torch zip archive whose members pass their CRC check."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def find_last_valid(directory: str | os.PathLike) -> Optional[pathlib.Path]:
    """The newest checkpoint that passes :func:`is_valid_checkpoint`, or None."""
    for _, path in reversed(list_checkpoints(directory)):
        if is_valid_checkpoint(path):
            return path
    return None


def clean_leftovers(directory: str | os.PathLike) -> list[pathlib.Path]:
    """Remove temporary files of interrupted writes; returns what was removed."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    removed = [p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to the one written last (older ones go only after a newer
    one exists). Checkpoints numbered above the one written last are neither counted nor removed: a
    resume starts from the newest *valid* checkpoint, so they are torn files it went back past, and
    counting them would delete the resumed run's good checkpoints and keep only the torn ones."""
    found = list_checkpoints(directory)
    if not found:
        return
    last = max(found, key=lambda sp: (_mtime_ns(sp[1]), sp[0]))[0]
    for _, path in [c for c in found if c[0] <= last][:-keep]:
        path.unlink(missing_ok=True)


def _mtime_ns(path: pathlib.Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return -1
