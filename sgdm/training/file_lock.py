"""An advisory lock file that one process at a time holds: work that every process of a run would
otherwise repeat on the same files (torchrun starts all ranks at once) is done by the first, while
the others wait and then find it done.

``flock`` locks belong to an open file, so two processes, and two opens in one process, exclude
each other. On a filesystem that is not shared between hosts, each host builds its own copy.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import sys
import time

__all__ = ["exclusive_lock"]


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str, notice_after: float = 10.0, poll: float = 0.2):
    """Hold an exclusive lock on ``path`` (created if missing) for the block.

    While another process holds it, wait; after ``notice_after`` seconds say once on stderr who is
    waited for (``what``: what the lock guards), so a long wait is not mistaken for a hang.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start, noticed = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not noticed and time.monotonic() - start >= notice_after:
                    print(f"sgdm: waiting for another process that is building {what} (lock {path})",
                          file=sys.stderr, flush=True)
                    noticed = True
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
