"""Lightning callbacks of the trainer: atomic periodic checkpoints (and on SIGTERM)."""
from __future__ import annotations

import pathlib
import signal
import threading

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from sgdm.training.checkpoint import checkpoint_name, prune_checkpoints

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
    """

    def __init__(self, directory: pathlib.Path, every: int, keep: int):
        self.directory, self.every, self.keep = pathlib.Path(directory), every, keep
        self.last_saved: int | None = None
        self.signalled = False
        self._previous_handler = None

    def save(self, trainer: pl.Trainer, step: int) -> None:
        if self.last_saved == step:
            return
        trainer.save_checkpoint(self.directory / checkpoint_name(step), weights_only=False)
        self.last_saved = step
        if trainer.is_global_zero:
            prune_checkpoints(self.directory, self.keep)

    def _note_sigterm(self, signum, frame) -> None:
        self.signalled = True  # no collective in a signal handler: decided at the batch end, by every process

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._note_sigterm)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        at_boundary = pl_module.next_position == int(batch["position"][0]) + 1
        # any process signalled -> every process saves now (saving is collective under DDP) and stops
        if trainer.strategy.reduce_boolean_decision(self.signalled or bool(trainer.received_sigterm), all=False):
            self.save(trainer, pl_module.step)
            raise SIGTERMException()
        if at_boundary and pl_module.step % self.every == 0:
            self.save(trainer, pl_module.step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module.step)
        self._restore_handler()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        """Lightning's handler back, before the trainer's teardown puts back the one from before fit
        (this hook runs first; a later one would leave Lightning's handler installed after fit)."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
