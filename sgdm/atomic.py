"""Atomic file writes: a file under its real name is always whole.

Every writer goes to a temporary ``.<name>.<pid>.tmp`` beside the target, which is flushed, fsynced
and renamed over it (``os.replace``), and the directory is fsynced; a failed or interrupted write
removes its temporary (a killed process leaves at most such a leftover, which
:func:`sgdm.training.checkpoint.clean_leftovers` removes). Light to import (torch only, no
Lightning), so the sampling pipeline, the annotation store and training share it.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from typing import Any

__all__ = ["TMP_SUFFIX", "atomic_path", "atomic_open", "atomic_write_text", "atomic_copy", "atomic_torch_save"]

TMP_SUFFIX = ".tmp"


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """The temporary path to write ``path``'s content to, for writers that take a file name (safetensors'
    ``save_file``); when the block ends, it is fsynced and renamed to ``path`` and the directory fsynced;
    on failure it is removed. An OSError of the write (a full disk) is raised again naming ``path``: the
    errno's message alone does not say which file of a run could not be written."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}{TMP_SUFFIX}"
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, f"could not write {path}: {err.strerror}; the file there, if any, is unchanged") \
            from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str):
    """:func:`atomic_path` as an open file (``mode`` "w" or "wb")."""
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (:func:`atomic_open`)."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_copy(src: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy file ``src`` to ``path`` atomically (:func:`atomic_open`)."""
    with open(src, "rb") as fin, atomic_open(path, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (:func:`atomic_open`)."""
    import torch

    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)
