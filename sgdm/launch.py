"""How this process was started, and which of the run's processes it is.

Several processes train one run when a launcher starts them: Lightning itself (``train.devices: 8``
on one machine starts 7 copies of the command, each with ``LOCAL_RANK``), ``torchrun``, or SLURM's
``srun``. Lightning's Trainer finds its ranks from the same environment variables (its
TorchElasticEnvironment comes first, then SLURMEnvironment, then its own launcher's), and so does
this module, for the work sgdm does before a Trainer exists: which process writes the run
directory, which GPU encodes the latent cache, how ``annotate`` joins its process group
(:func:`join_process_group`). A SLURM job
named ``bash`` or ``interactive`` is no launch (Lightning's rule: an interactive shell on an
allocation).

:func:`check_launch` compares the launcher's process counts with ``train.devices`` and
``train.num_nodes`` before any work, and names the key to change; Lightning would otherwise stop
with a traceback once data and first stage are prepared.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Literal, Optional

from sgdm.config.core import ConfigError

__all__ = ["Launch", "current", "check_launch", "join_process_group", "process_group", "rank_world", "local_gpu"]

Launcher = Literal["none", "lightning", "torchrun", "srun"]


@dataclasses.dataclass(frozen=True)
class Launch:
    """One process's place in its launch.

    ``rank`` is None where the launcher does not say (a copy Lightning started on a node other
    than the first); ``per_node`` and ``nodes`` are None where it does not set them.
    """

    launcher: Launcher
    world_size: int
    rank: Optional[int]
    local_rank: int
    node_rank: int
    per_node: Optional[int] = None
    nodes: Optional[int] = None

    @property
    def is_first(self) -> bool:
        """The process that writes what the run has once (its directory, its records)."""
        return self.rank == 0 if self.rank is not None else self.node_rank == 0 and self.local_rank == 0


def _int(name: str, default: Optional[int] = None) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(name, f"environment variable {name}={value!r} is not an integer (set by the launcher "
                                "that started this process)") from None


def srun_launched() -> bool:
    """Started by ``srun`` (Lightning's test: ``SLURM_NTASKS`` set, and the job is not named ``bash`` or
    ``interactive``)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def current() -> Launch:
    """This process's :class:`Launch`, from the environment its launcher set."""
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID") is not None:  # torch.distributed.is_torchelastic_launched()
        world, per_node = _int("WORLD_SIZE", 1), _int("LOCAL_WORLD_SIZE")
        nodes = world // per_node if per_node and world % per_node == 0 else None
        return Launch("torchrun", world, _int("RANK", 0), _int("LOCAL_RANK", 0), _int("GROUP_RANK", 0), per_node,
                      nodes)
    if srun_launched():
        return Launch("srun", _int("SLURM_NTASKS", 1), _int("SLURM_PROCID", 0), _int("SLURM_LOCALID", 0),
                      _int("SLURM_NODEID", 0), _int("SLURM_NTASKS_PER_NODE"), _int("SLURM_NNODES"))
    if "LOCAL_RANK" in env or "NODE_RANK" in env:  # Lightning's launcher (or a command run on each node by hand)
        local, node = _int("LOCAL_RANK", 0), _int("NODE_RANK", 0)
        rank = _int("RANK", local if node == 0 else None)
        return Launch("lightning", _int("WORLD_SIZE", 1), rank, local, node)
    return Launch("none", 1, 0, 0, 0)


def local_gpu() -> int:
    """The CUDA index of this process's GPU: its local rank, as Lightning places a process; or 0 where the
    process sees one GPU only (``srun --gpus-per-task=1`` gives each task its own). For the work sgdm does
    outside Lightning (annotate, eval, encoding before training). A local rank beyond the GPUs the process
    sees (more processes on a node than GPUs, ``srun --gpus-per-task=2``) is a :class:`ConfigError` naming
    the launcher's variable, instead of CUDA's "invalid device ordinal" at the first use."""
    import torch

    count = torch.cuda.device_count()
    if count == 1:
        return 0
    launch = current()
    if 0 < count <= launch.local_rank:
        name = "SLURM_LOCALID" if launch.launcher == "srun" else "LOCAL_RANK"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise ConfigError(name, f"this process is local rank {launch.local_rank} of its node, but it sees {count} "
                                f"GPU(s){seen}: start at most {count} processes per node, or give each process "
                                "one GPU of its own (srun --gpus-per-task=1)")
    return launch.local_rank


def check_launch(devices, num_nodes: int, accelerator: str = "auto", section: str = "train") -> None:
    """The processes a launcher started are the ones ``section.devices`` x ``section.num_nodes`` ask for;
    else a :class:`ConfigError` naming the key and the value to set. ``devices: auto`` counts as the
    GPUs torch sees (on a GPU accelerator) or 1, as Lightning resolves it."""
    launch = current()
    if launch.launcher not in ("torchrun", "srun"):
        return
    if devices == "auto":
        import torch

        gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        devices = torch.cuda.device_count() if gpu else 1
    per_node = launch.per_node
    option = "--nproc-per-node" if launch.launcher == "torchrun" else "--ntasks-per-node"
    if launch.launcher == "srun" and per_node is None and launch.world_size > 1:
        raise ConfigError(f"{section}.devices", f"srun started {launch.world_size} tasks with --ntasks, which "
                                                "Lightning does not read; start them with --ntasks-per-node (and "
                                                "--nodes) instead")
    if per_node is not None and devices != per_node:
        raise ConfigError(f"{section}.devices", f"{devices}, but {launch.launcher} started {per_node} processes "
                                                f"per node ({option}); set {section}.devices={per_node}")
    nodes = launch.nodes
    if nodes is not None and num_nodes != nodes:
        raise ConfigError(f"{section}.num_nodes", f"{num_nodes}, but {launch.launcher} runs on {nodes} node(s); set "
                                                  f"{section}.num_nodes={nodes}")
    if launch.launcher == "torchrun" and devices * num_nodes != launch.world_size:
        raise ConfigError(f"{section}.devices", f"{section}.devices x {section}.num_nodes = {devices} x {num_nodes}, "
                                                f"but torchrun started {launch.world_size} processes (WORLD_SIZE)")


def _backend(device: Optional[str]) -> str:
    """NCCL where the command's tensors live on GPUs; gloo for a command run on the CPU (``device`` "cpu"),
    which NCCL would refuse with more processes on a node than GPUs, and where CUDA is missing."""
    import torch

    if not torch.cuda.is_available():
        return "gloo"
    if device is not None and device != "auto" and torch.device(device).type == "cpu":
        return "gloo"
    return "nccl"


def join_process_group(device: Optional[str] = None) -> bool:
    """Join the process group of the launch that started this process: torchrun's (or one described by
    ``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set by hand), or srun's, with its
    main address and port found as Lightning finds them (``MASTER_ADDR`` / ``MASTER_PORT``, else the
    first node of ``SLURM_NODELIST`` and a port from the job id). ``device``: where the command works
    ("cpu", "cuda", "auto"; None as "auto"), which picks the backend. True when distributed."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    launch = current()
    srun = launch.launcher == "srun" and launch.world_size > 1
    if not srun and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = _backend(device)
    if backend == "nccl":
        torch.cuda.set_device(local_gpu())
    if not srun:
        dist.init_process_group(backend)
    else:
        address, port = _slurm_main_address()
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=launch.rank,
                                world_size=launch.world_size)
    return True


def _slurm_main_address() -> tuple[str, int]:
    """(host, port) of rank 0 of an srun launch, as Lightning's SLURMEnvironment finds them: ``MASTER_ADDR``
    else the first node of ``SLURM_NODELIST``; ``MASTER_PORT`` else 15000 + the job id's last 4 digits.
    Not through a SLURMEnvironment, which refuses ``srun --ntasks`` without ``--ntasks-per-node``: a
    training run needs the tasks per node (:func:`check_launch`), annotate and eval need only the ranks."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    address = os.environ.get("MASTER_ADDR") or \
        SLURMEnvironment.resolve_root_node_address(os.environ.get("SLURM_NODELIST", "127.0.0.1"))
    port = _int("MASTER_PORT")
    if port is None:
        job = os.environ.get("SLURM_JOB_ID")
        port = int(job[-4:]) + 15000 if job and job[-4:].isdigit() else 12910
    return address, port


def rank_world() -> tuple[int, int]:
    """(rank, world size) in the joined process group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def process_group(device: Optional[str] = None):
    """:func:`join_process_group` for the time of a command (``with process_group() as joined:``): the
    group it joined is destroyed on the way out, also after an error. Left to the interpreter's exit,
    gloo's and NCCL's threads now and then abort it ("terminate called without an active exception",
    exit code -6) after the command has finished."""
    import torch.distributed as dist

    already = dist.is_available() and dist.is_initialized()
    joined = join_process_group(device)
    try:
        yield joined
    finally:
        if joined and not already and dist.is_initialized():
            dist.destroy_process_group()
