"""Ranks that stop together: an error on one rank of annotate's process group stops every rank promptly.

A rank whose work raises while the others wait for it in a collective would leave them waiting until
the collective's timeout (annotate's barriers wait hours, see
:data:`~sgdm.annotation.annotate.WAIT_TIMEOUT`; NCCL's default is 10 minutes, then the job is killed
without a word of why). Instead, a stage runs each rank's own work under :meth:`Failures.held`, which
keeps the error, and every rank meets at the stage's next collective with a flag saying whether its
work failed: added to a collective the stage makes anyway (the gradients' all-reduce of each STEGO
training step, :meth:`Failures.flag` and :meth:`Failures.raise_if`) or one of its own
(:meth:`Failures.settle`). Where a flag is up, the ranks exchange their errors, the failing rank
raises its own and the others :class:`RankFailed`, naming that rank and its error.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

__all__ = ["RankFailed", "Failures"]


class RankFailed(RuntimeError):
    """Another rank of the process group failed (the message names it and its error); this one stops too."""


class Failures:
    """The error of this rank's work in one stage of ``what`` (e.g. ``"training the STEGO head"``), whose
    collectives run on ``device`` over ``group`` (None: the default group). Outside a process group, or
    without ``distributed``, nothing is held: errors are raised where they happen."""

    def __init__(self, what: str, device, distributed: bool = True, group=None):
        import torch.distributed as dist

        self.what, self.device, self.group = what, torch.device(device), group
        self.active = distributed and dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if self.active else 1
        self.error: Optional[BaseException] = None

    @contextlib.contextmanager
    def held(self):
        """Run the block; with several ranks, an error it raises is kept for the stage's next collective
        (:meth:`settle` or :meth:`raise_if`), which every rank must reach before running another block."""
        if not self.active:
            yield
            return
        if self.error is not None:
            raise RuntimeError("Failures.held: this rank failed and has not met the others since") from self.error
        try:
            yield
        except BaseException as err:  # noqa: BLE001 - Ctrl-C too: the others are told, then it is raised again
            self.error = err

    def flag(self) -> torch.Tensor:
        """``[1]`` float: 1 where this rank's work failed, to be summed over the ranks (:meth:`raise_if`)."""
        return torch.tensor([float(self.error is not None)], device=self.device)

    def raise_if(self, flags: torch.Tensor) -> None:
        """After the all-reduce (sum) of every rank's :meth:`flag`: nothing where none failed; else every
        rank gathers the errors (one collective, all ranks take it) and this one raises its own, or
        :class:`RankFailed` naming the first failed rank and its error."""
        if float(flags.reshape(-1)[0]) == 0:
            return
        import torch.distributed as dist

        messages: list = [None] * self.world
        mine = None if self.error is None else f"{type(self.error).__name__}: {self.error}"
        dist.all_gather_object(messages, mine, group=self.group)
        if self.error is not None:
            raise self.error
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if not failed:  # a rank whose flag was up without an error of its own (cannot happen here)
            raise RankFailed(f"annotate: another rank failed {self.what}; this one stops too")
        rank, message = failed[0]
        raise RankFailed(f"annotate: another rank failed {self.what}: rank {rank} of {self.world} raised {message}; "
                         f"this one stops too")

    def settle(self) -> None:
        """Meet the other ranks (one all-reduce of the flags) and stop every rank where one failed."""
        if not self.active:
            return
        import torch.distributed as dist

        flags = self.flag()
        dist.all_reduce(flags, group=self.group)
        self.raise_if(flags)
