"""Lightning callbacks of the trainer: atomic periodic checkpoints (and on SIGTERM)."""
from __future__ import annotations

import pathlib

import pytorch_lightning as pl

from sgdm.training.checkpoint import checkpoint_name, prune_checkpoints

__all__ = ["StepCheckpoint"]


class StepCheckpoint(pl.Callback):
    """Save ``step-XXXXXXXX.ckpt`` every ``every`` optimiser steps, on SIGTERM and at the end.

    Checkpoints are taken right after an optimiser step (or, on SIGTERM during
    gradient accumulation, with the partial accumulation dropped: the resumed
    run redoes those micro-batches from the same positions, so nothing differs).
    Writing goes through the trainer's checkpoint IO, which is atomic.
    """

    def __init__(self, directory: pathlib.Path, every: int, keep: int):
        self.directory, self.every, self.keep = pathlib.Path(directory), every, keep
        self.last_saved: int | None = None

    def save(self, trainer: pl.Trainer, step: int) -> None:
        if self.last_saved == step:
            return
        trainer.save_checkpoint(self.directory / checkpoint_name(step), weights_only=False)
        self.last_saved = step
        if trainer.is_global_zero:
            prune_checkpoints(self.directory, self.keep)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        at_boundary = pl_module.next_position == int(batch["position"][0]) + 1
        # any rank signalled -> every rank saves now (saving is collective under DDP)
        if trainer.strategy.reduce_boolean_decision(bool(trainer.received_sigterm), all=False):
            self.save(trainer, pl_module.step)
        elif at_boundary and pl_module.step % self.every == 0:
            self.save(trainer, pl_module.step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module.step)
