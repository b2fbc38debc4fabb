"""Lightning callbacks of the trainer: atomic periodic checkpoints (and on SIGTERM or Ctrl+C)."""
from __future__ import annotations

import pathlib
import signal
import sys
import threading

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from sgdm.training.checkpoint import AtomicCheckpointIO, checkpoint_name, prune_checkpoints

__all__ = ["StepCheckpoint"]


class StepCheckpoint(pl.Callback):
    """Save ``step-XXXXXXXX.ckpt`` every ``every`` optimiser steps, on SIGTERM and at the end.

    Checkpoints are taken right after an optimiser step (or, on SIGTERM during
    gradient accumulation, with the partial accumulation dropped: the resumed
    run redoes those micro-batches from the same positions, so nothing differs).
    Writing goes through the trainer's checkpoint IO, which is atomic.

    SIGTERM (a scheduler's time limit or preemption, ``kill``) is taken by a handler of this callback
    for the time of training: it only notes the signal. At the end of each batch every process learns
    whether any of them was signalled (one all-reduce under DDP), and if so they all write the
    checkpoint together and raise :class:`~pytorch_lightning.utilities.exceptions.SIGTERMException`
    together. Lightning's own handler, replaced here, runs a broadcast inside the signal handler
    (2.6), which pairs with whatever collective the other processes are in and hangs DDP when every
    process is signalled at once, as SLURM and torchrun do.

    Ctrl+C (SIGINT) is taken the same way: the first one stops the run after the current batch, with a
    checkpoint (``sgdm-ldm train`` exits 130); a second one stops at once (KeyboardInterrupt, no
    checkpoint). Lightning's own answer to Ctrl+C was a "graceful shutdown" without one, losing the
    steps since the last periodic checkpoint.

    The handlers stay until the trainer's teardown, which puts back the handler from before fit
    (recorded in :meth:`setup`; :meth:`on_exception` and :meth:`teardown` put it back too, should
    Lightning's teardown not run). A SIGTERM after the last checkpoint (between :meth:`on_train_end` and
    the teardown) is noted and ignored: the run is complete. Lightning's handler, given back there before,
    ran its collective and made the finished run exit 143 without its export.
    """

    def __init__(self, directory: pathlib.Path, every: int, keep: int):
        self.directory, self.every, self.keep = pathlib.Path(directory), every, keep
        self.last_saved: int | None = None
        self.signalled = False
        self.signal_name: str | None = None  # "SIGTERM" or "SIGINT": what this process received first
        self._before_fit = {}  # the SIGTERM and SIGINT handlers from before fit, put back after it
        self._installed = False

    def save(self, trainer: pl.Trainer, step: int) -> None:
        if self.last_saved == step:
            return
        path = self.directory / checkpoint_name(step)
        io = trainer.strategy.checkpoint_io
        if trainer.world_size <= 1 or not isinstance(io, AtomicCheckpointIO):
            trainer.save_checkpoint(path, weights_only=False)
        else:
            # rank 0 alone writes; every process learns whether it could, and all stop together if not
            io.keep_failure, io.failure = True, None
            try:
                trainer.save_checkpoint(path, weights_only=False)
            finally:
                io.keep_failure = False
            failure, io.failure = io.failure, None
            if trainer.strategy.reduce_boolean_decision(failure is not None, all=False):
                if failure is not None:
                    raise failure
                raise RuntimeError(f"sgdm: rank 0 could not write {path} (its error says why); every process stops")
        self.last_saved = step
        if trainer.is_global_zero:
            prune_checkpoints(self.directory, self.keep)

    def _note_sigterm(self, signum, frame) -> None:
        self.signalled = True  # no collective in a signal handler: decided at the batch end, by every process
        self.signal_name = self.signal_name or "SIGTERM"

    def _note_sigint(self, signum, frame) -> None:
        if self.signal_name == "SIGINT":  # the second Ctrl+C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signalled = True
        self.signal_name = self.signal_name or "SIGINT"
        print("\nsgdm: Ctrl+C: stopping after this batch with a checkpoint; Ctrl+C again stops at once, without one",
              file=sys.stderr, flush=True)

    _HANDLERS = {signal.SIGTERM: "_note_sigterm", signal.SIGINT: "_note_sigint"}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():  # before Lightning registers its own
            self._before_fit = {sig: signal.getsignal(sig) for sig in self._HANDLERS}

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, name in self._HANDLERS.items():
                signal.signal(sig, getattr(self, name))
            self._installed = True
        self._check_same_start(trainer, pl_module)

    def _check_same_start(self, trainer, pl_module) -> None:
        """Every process starts at the same step: each picked the newest valid checkpoint of the run on its
        own, and a network filesystem whose listing is cached on one node (NFS attribute caching after a
        requeue) could give them different ones. DDP would then train on with one process's weights (it
        broadcasts them) but each process's own step, optimiser state and data position."""
        if trainer.world_size <= 1:
            return
        import torch

        steps = trainer.strategy.all_gather(torch.tensor(int(pl_module.step), device=pl_module.device)).reshape(-1)
        if bool((steps != steps[0]).any()):
            raise RuntimeError(f"sgdm: the processes of this run start from different steps ({steps.tolist()}, by "
                               f"rank): each took the newest valid checkpoint in {self.directory} on its own, and "
                               "their filesystems showed them different ones (a network filesystem's cached "
                               "listing?); run the same command again once every node sees the same checkpoints")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        at_boundary = pl_module.next_position == int(batch["position"][0]) + 1
        # any process signalled -> every process saves now (saving is collective under DDP) and stops
        if trainer.strategy.reduce_boolean_decision(self.signalled or bool(trainer.received_sigterm), all=False):
            self.save(trainer, pl_module.step)
            raise SIGTERMException()
        if at_boundary and pl_module.step % self.every == 0:
            self.save(trainer, pl_module.step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module.step)  # the handler stays: a SIGTERM from here on finds the run complete

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handler()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        """The handlers from before fit back, where this callback's are still installed (Lightning's teardown
        puts SIGTERM's back as well; this covers a path that skips it)."""
        if not self._installed:
            return
        self._installed = False
        for sig, name in self._HANDLERS.items():
            if signal.getsignal(sig) == getattr(self, name):
                before = self._before_fit.get(sig)
                signal.signal(sig, before if before is not None else signal.SIG_DFL)
