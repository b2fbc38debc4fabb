"""The torch device a config or a flag names: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

:func:`sgdm.config.core.check_device` checks the spelling when a config is validated;
:func:`resolve_device` turns the name into a device where the work starts, and says
which key named a GPU this machine does not have, instead of failing deep inside torch.
"""
from __future__ import annotations

import os
import warnings

import torch

from sgdm.config.core import ConfigError, check_device

__all__ = ["resolve_device", "check_accelerator"]


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(value: str, key: str = "device") -> torch.device:
    """``auto``: this process's GPU (its local rank under torchrun or srun, :mod:`sgdm.launch`) when CUDA
    is available, else the CPU. Any other value must name a device that exists here; otherwise
    :class:`ConfigError` naming ``key`` (a config key path or a flag)."""
    check_device(key, value)
    cuda = _cuda_count()
    if value == "auto":
        if not cuda:
            return torch.device("cpu")
        from sgdm.launch import local_gpu

        return torch.device("cuda", local_gpu())
    device = torch.device(value)
    if device.type == "cuda":
        if cuda == 0:
            raise ConfigError(key, f"{value!r}, but torch sees no CUDA device on this machine (use cpu or auto)")
        if device.index is not None and device.index >= cuda:
            raise ConfigError(key, f"{value!r}, but torch sees {cuda} CUDA device(s)")
    return device


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_overrides(devices, strategy: str, precision: str, section: str) -> str:
    """The overrides that turn a GPU section into a one-process CPU run (those already right left out):
    without devices=1 and strategy=auto, ``devices: 8`` starts 8 CPU processes; mixed precision on a
    CPU is bf16 autocast, slow and not what the config's numbers were tuned with."""
    mixed = str(precision) in ("16-mixed", "fp16-mixed", "bf16-mixed")
    wanted = [("accelerator", "cpu", True), ("devices", 1, devices != 1), ("strategy", "auto", strategy != "auto"),
              ("precision", 32, mixed)]
    return " ".join(f"{section}.{key}={value}" for key, value, needed in wanted if needed)


def check_accelerator(accelerator: str, devices, section: str = "train", *, strategy: str = "auto",
                      precision: str = "32", num_nodes: int = 1) -> None:
    """Lightning's ``accelerator`` and ``devices`` (of ``section``): ``gpu`` / ``cuda`` need a CUDA
    device here, and as many as an integer ``devices`` asks for. Checked where a command starts, so
    that a run meant for a GPU machine fails at once, not after its data and first stage are prepared;
    the error gives every override a CPU run of the section needs. A CPU run with more processes than
    usable cores (``devices: 8`` of a GPU config under ``accelerator: auto``) is warned about. Under
    torchrun or srun, ``devices`` and ``num_nodes`` must be the processes it started
    (:func:`sgdm.launch.check_launch`)."""
    from sgdm.launch import check_launch

    check_launch(devices, num_nodes, accelerator, section)
    cuda = _cuda_count()
    if accelerator in ("gpu", "cuda"):
        if cuda == 0:
            raise ConfigError(f"{section}.accelerator",
                              f"{accelerator!r}, but torch sees no CUDA device on this machine; for a CPU run "
                              f"override {_cpu_overrides(devices, strategy, precision, section)}")
        if isinstance(devices, int) and devices > cuda:
            from sgdm.launch import srun_launched

            hint = ("; srun --gpus-per-task gives each task a GPU of its own, but every task of a training run must "
                    "see all the node's GPUs: use --gpus-per-node") if srun_launched() and cuda == 1 else ""
            raise ConfigError(f"{section}.devices", f"{devices} GPUs per node, but torch sees {cuda} CUDA device(s)"
                                                    f"{hint}")
        return
    cores = _usable_cores()
    if (accelerator == "cpu" or cuda == 0) and isinstance(devices, int) and devices > 1 and devices > cores:
        warnings.warn(f"{section}.devices={devices} on the CPU starts {devices} processes on {cores} usable core(s), "
                      f"each slower than one process alone; for one process override "
                      f"{section}.devices=1 {section}.strategy=auto ({section}.batch_size is global: the same "
                      f"samples are trained on)", stacklevel=2)
