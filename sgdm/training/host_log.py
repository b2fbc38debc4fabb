"""Logging from a LightningModule without a host sync per step.

Lightning turns every ``prog_bar`` metric into a Python number after every batch (bar or no bar),
and copies a logged Python number to the module's device: on a GPU both are blocking. So the bar
only gets host numbers, read at the logging cadence, and numbers are logged as CPU tensors.
"""
from __future__ import annotations

import torch

__all__ = ["HostLogging"]


def _log_dtype() -> torch.dtype:
    """The dtype Lightning gives a logged Python number (the default dtype, at least float32)."""
    dtype = torch.get_default_dtype()
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class HostLogging:
    """Mixin for a ``pl.LightningModule``."""

    def _log_host(self, name: str, value: float, **kwargs) -> None:
        """Log a Python number as a CPU tensor: Lightning keeps it on the CPU, where a number would be
        copied to the module's device (a blocking copy, i.e. a host sync, on the GPU) on every call."""
        self.log(name, torch.tensor(float(value), dtype=_log_dtype()), on_step=True, **kwargs)

    def _log_bar_loss(self, loss: torch.Tensor, step: int, last_micro: bool, log_every: int) -> None:
        """The bar's ``loss``: a host copy of ``loss`` read on the last micro-batch of every
        ``log_every``-th optimiser step (one sync per ``log_every`` steps)."""
        if last_micro and step % log_every == 0:
            self._log_host("loss", float(loss), prog_bar=True, logger=False)
