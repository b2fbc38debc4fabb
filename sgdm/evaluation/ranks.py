"""Several processes evaluating one run: which images each samples, and how they reach the first.

Under ``torchrun`` or ``srun`` (:func:`sgdm.launch.join_process_group`) every rank of
:func:`sgdm.evaluation.evaluate.evaluate_run` draws the same conditions and per-image generators and
samples one contiguous run of whole batches (:func:`share`); the others hand their samples to rank 0
through files (:class:`Shares`), and rank 0 measures. :func:`agree` turns an error on any rank before
sampling into an error on all of them.
"""
from __future__ import annotations

import os
import pathlib
import secrets
import shutil
import time
from typing import Callable, Optional

import torch

from sgdm.config.core import ConfigError

__all__ = ["share", "agree", "Shares", "process_device"]


def share(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Images ``[lo, hi)`` of ``n`` that process ``rank`` of ``world`` samples: a contiguous run of the
    ``ceil(n / batch_size)`` batches one process samples, so every batch (and so every image, up to the
    device's own nondeterminism) is the same as in a one-process evaluation. Ranks beyond the number of
    batches get none (``lo == hi``)."""
    batches = -(-n // batch_size)
    first, last = batches * rank // world, batches * (rank + 1) // world
    return min(first * batch_size, n), min(last * batch_size, n)


def agree(world: int, step: Callable[[], tuple]) -> tuple:
    """``step()`` on every rank, then one collective, so that an error on any rank (a config error, a
    missing file, out of memory while loading) stops all of them here, each naming it, instead of
    leaving the others waiting. The first failing rank's own exception is raised as it is."""
    if world == 1:
        return step()
    import torch.distributed as dist

    error: Optional[BaseException] = None
    result: tuple = ()
    try:
        result = step()
    except Exception as err:  # noqa: BLE001 - reported to every rank, then raised again below
        error = err
    messages: list = [None] * world
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, message = failed[0]
        raise RuntimeError(f"rank {r} of {world} stopped before sampling: {message}")
    return result


class Shares:
    """The samples of ranks 1.. reach rank 0 as files in ``folder`` (``<eval output>/.rank-samples``):
    ``w<scale index>-rank<rank>.pt`` (float32 [m, 3, H, W], written atomically), read in rank order and
    deleted by rank 0, so that rank 0 measures exactly the float images one process would (fd and
    adherence read the floats, not their uint8 rounding). No collective waits on rank 0 while it
    measures (NCCL's watchdog ends a collective after 10 minutes): the other ranks write and go on.

    Each evaluation keeps its files in a folder of its own, ``folder/<session>/``: rank 0 draws the
    session name and broadcasts it when the object is made (every rank makes it at the same point, so
    this is one collective), so two evaluations of one run at the same time (another ``--seed`` or
    ``--sweep-scale`` in a second job) never read or delete each other's samples. Rank 0 holds an
    ``flock`` on ``folder/<session>.lock`` while it evaluates; its first :meth:`clear` removes what
    evaluations no longer running left (a crash's sessions, whose lock nobody holds, and the flat files of
    an older sgdm), the second (at the end) its own session. Where the filesystem has no ``flock``, the
    first :meth:`clear` removes every other session, as a crash's leftovers. ``session=None`` (made
    outside a process group) keeps the files in ``folder`` itself.

    A rank whose sampling raises writes ``rank<rank>.failed`` with the error; rank 0 stops with it while
    waiting for that rank's samples, and the others stop at their next scale when rank 0 has failed. A
    rank killed without a Python error (SIGKILL, host memory) leaves rank 0 waiting: torchrun then stops
    every process; under srun use ``--kill-on-bad-exit=1``."""

    POLL_S, REPORT_S, FRESH_S = 0.5, 600.0, 10.0
    LOCK_SUFFIX = ".lock"

    def __init__(self, folder: pathlib.Path, rank: int, world: int, session: Optional[str] = None):
        self.folder, self.rank, self.world = pathlib.Path(folder), rank, world
        if session is None and world > 1:
            session = _broadcast_session(rank)
        self.session = session
        self.dir = self.folder / session if session is not None else self.folder
        self._lock = None  # rank 0's open, flocked lock file while it evaluates (see clear)

    def path(self, index: int, rank: int) -> pathlib.Path:
        return self.dir / f"w{index:03d}-rank{rank:05d}.pt"

    def _marker(self, rank: int) -> pathlib.Path:
        return self.dir / f"rank{rank:05d}.failed"

    def clear(self) -> None:
        """Rank 0, before sampling: take this session's lock and remove what evaluations that are no longer
        running left in ``folder``; called again (at the end): remove this session's files and lock."""
        if self.session is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        if self._lock is None:
            self._begin()
        else:
            self._finish()

    def _begin(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock_path = self.folder / f"{self.session}{self.LOCK_SUFFIX}"
        self._lock = open(lock_path, "a+")  # noqa: SIM115 - held until _finish, or until this object goes
        _try_flock(self._lock)  # the first file of the session; its folder comes after it
        for entry in list(self.folder.iterdir()):
            if entry.name in (self.session, lock_path.name):
                continue
            if entry.name.endswith(self.LOCK_SUFFIX):
                self._remove_if_stale(entry)
            elif entry.is_dir() and not entry.is_symlink():
                if not (self.folder / f"{entry.name}{self.LOCK_SUFFIX}").exists():
                    shutil.rmtree(entry, ignore_errors=True)  # its lock is gone: a crash's, or a finished one's
            else:  # the flat files of an older sgdm's crashed evaluation, and their temporary files
                entry.unlink(missing_ok=True)

    def _remove_if_stale(self, lock: pathlib.Path) -> None:
        """Remove the session of ``lock`` and the lock when no process holds it (without flock: always),
        unless it was made in the last seconds (a session that opened its lock and has yet to take it)."""
        try:
            fh = open(lock, "a+")  # noqa: SIM115
        except OSError:
            return
        with fh:
            try:
                fresh = time.time() - os.fstat(fh.fileno()).st_mtime < self.FRESH_S
            except OSError:
                return
            if fresh or _try_flock(fh) is False:
                return  # just made, or held: that evaluation is running
            shutil.rmtree(self.folder / lock.name[:-len(self.LOCK_SUFFIX)], ignore_errors=True)
            lock.unlink(missing_ok=True)

    def _finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.folder / f"{self.session}{self.LOCK_SUFFIX}").unlink(missing_ok=True)
        self._lock.close()
        self._lock = None
        try:
            self.folder.rmdir()  # gone unless another evaluation is using it
        except OSError:
            pass

    def put(self, index: int, images: torch.Tensor) -> None:
        from sgdm.atomic import atomic_torch_save

        atomic_torch_save(images.contiguous(), self.path(index, self.rank))

    def fail(self, err: BaseException) -> None:
        """Leave ``err`` for the other ranks to read (best effort: the folder may be gone)."""
        try:
            from sgdm.atomic import atomic_write_text

            atomic_write_text(self._marker(self.rank), f"{type(err).__name__}: {err}")
        except OSError:
            pass

    def check(self, rank: int) -> None:
        """RuntimeError when ``rank`` has left a failure marker."""
        marker = self._marker(rank)
        if marker.is_file():
            raise RuntimeError(f"rank {rank} of {self.world} stopped: {marker.read_text()}")

    def gather(self, index: int, own: Optional[torch.Tensor], bounds: list[tuple[int, int]],
               log: Callable[[str], None]) -> torch.Tensor:
        """Rank 0: the ``bounds[-1][1]`` images of scale ``index``, its ``own`` share and the others' files
        in rank order (each deleted once copied; one share in memory at a time besides the result)."""
        out = None
        for r, (lo, hi) in enumerate(bounds):
            if hi == lo:
                continue
            part = own if r == 0 else self._wait(index, r, log)
            if out is None:
                out = part.new_empty((bounds[-1][1], *part.shape[1:]))
            if part.shape[0] != hi - lo or part.shape[1:] != out.shape[1:]:
                raise RuntimeError(f"{self.path(index, r)}: {tuple(part.shape)}, expected {hi - lo} images of "
                                   f"{tuple(out.shape[1:])} (rank {r} of {self.world})")
            out[lo:hi] = part
            del part
            if r:
                self.path(index, r).unlink()
        return out

    def _wait(self, index: int, rank: int, log: Callable[[str], None]) -> torch.Tensor:
        path, start, reported = self.path(index, rank), time.monotonic(), 0.0
        while not path.is_file():
            self.check(rank)
            waited = time.monotonic() - start
            if waited - reported >= self.REPORT_S:
                reported = waited
                log(f"eval: waiting {waited / 60:.0f} min for the samples of rank {rank} ({path}); a process "
                    "killed without an error leaves this one waiting: stop the job (srun: --kill-on-bad-exit=1)")
            time.sleep(self.POLL_S)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def process_device(value: str, world: int) -> torch.device:
    """``eval.device`` for this process: with several processes ``cuda`` (like ``auto``) is this
    process's own GPU (its local rank), and ``cuda:N`` is refused where there are several GPUs, which
    every process would share."""
    from sgdm.devices import resolve_device

    device = resolve_device(value, "eval.device")
    if world == 1 or device.type != "cuda":
        return device
    from sgdm.launch import current, local_gpu

    launch = current()
    if value == "auto" or device.index is None:  # auto resolves to an index already: the local GPU's
        return torch.device("cuda", local_gpu())
    per_node = launch.per_node or world
    if per_node > 1 and torch.cuda.device_count() > 1:
        raise ConfigError("eval.device", f"{value!r} puts the {per_node} processes of this machine on one GPU; use "
                                         "auto or cuda (each process its own GPU: its local rank)")
    return device


def _broadcast_session(rank: int) -> Optional[str]:
    """A name rank 0 draws for one evaluation's hand-over folder, the same on every rank (one collective);
    None outside an initialised process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    name = [f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    return name[0]


def _try_flock(fh) -> Optional[bool]:
    """An exclusive, non-blocking ``flock`` on open file ``fh``: True when taken, False when another open
    file holds it, None where the filesystem does not lock (some Lustre or NFS mounts)."""
    import fcntl

    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None
