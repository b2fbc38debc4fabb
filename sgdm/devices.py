"""The torch device a config or a flag names: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

:func:`sgdm.config.core.check_device` checks the spelling when a config is validated;
:func:`resolve_device` turns the name into a device where the work starts, and says
which key named a GPU this machine does not have, instead of failing deep inside torch.
"""
from __future__ import annotations

import os

import torch

from sgdm.config.core import ConfigError, check_device

__all__ = ["resolve_device", "check_accelerator"]


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(value: str, key: str = "device") -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is available, else the
    CPU. Any other value must name a device that exists here; otherwise :class:`ConfigError` naming
    ``key`` (a config key path or a flag)."""
    check_device(key, value)
    cuda = _cuda_count()
    if value == "auto":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    device = torch.device(value)
    if device.type == "cuda":
        if cuda == 0:
            raise ConfigError(key, f"{value!r}, but torch sees no CUDA device on this machine (use cpu or auto)")
        if device.index is not None and device.index >= cuda:
            raise ConfigError(key, f"{value!r}, but torch sees {cuda} CUDA device(s)")
    return device


def check_accelerator(accelerator: str, devices, section: str = "train") -> None:
    """Lightning's ``accelerator`` and ``devices`` (of ``section``): ``gpu`` / ``cuda`` need a CUDA
    device here, and as many as an integer ``devices`` asks for. Checked where a command starts, so
    that a run meant for a GPU machine fails at once, not after its data and first stage are prepared."""
    if accelerator not in ("gpu", "cuda"):
        return
    cuda = _cuda_count()
    if cuda == 0:
        raise ConfigError(f"{section}.accelerator",
                          f"{accelerator!r}, but torch sees no CUDA device on this machine (use cpu or auto)")
    if isinstance(devices, int) and devices > cuda:
        raise ConfigError(f"{section}.devices", f"{devices} GPUs per node, but torch sees {cuda} CUDA device(s)")
