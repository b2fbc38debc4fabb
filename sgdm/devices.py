"""The torch device a config or a flag names: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

:func:`sgdm.config.core.check_device` checks the spelling when a config is validated;
:func:`resolve_device` turns the name into a device where the work starts, and says
which key named a GPU this machine does not have, instead of failing deep inside torch.
"""
from __future__ import annotations

import os

import torch

from sgdm.config.core import ConfigError, check_device

__all__ = ["resolve_device"]


def resolve_device(value: str, key: str = "device") -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is available, else the
    CPU. Any other value must name a device that exists here; otherwise :class:`ConfigError` naming
    ``key`` (a config key path or a flag)."""
    check_device(key, value)
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if value == "auto":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    device = torch.device(value)
    if device.type == "cuda":
        if cuda == 0:
            raise ConfigError(key, f"{value!r}, but torch sees no CUDA device on this machine (use cpu or auto)")
        if device.index is not None and device.index >= cuda:
            raise ConfigError(key, f"{value!r}, but torch sees {cuda} CUDA device(s)")
    return device
