"""Which process of a launch this is (torchrun, srun, Lightning's launcher), as Lightning reads it, and the
launcher's process counts against train.devices / train.num_nodes before any work."""
from __future__ import annotations

import pytest
import torch

from sgdm.config.core import ConfigError
from sgdm.devices import check_accelerator, resolve_device
from sgdm.launch import Launch, check_launch, current

LAUNCH_VARIABLES = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK",
                    "NODE_RANK", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_PROCID",
                    "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NAME")


@pytest.fixture
def env(monkeypatch):
    """``env(NAME=value, ...)`` sets launch variables; ``env.clear()`` removes them all (none at the start)."""
    def clear():
        for name in LAUNCH_VARIABLES:
            monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    clear()
    set_env.clear = clear
    return set_env


def torchrun(env, rank, local, node, world, per_node):
    env(TORCHELASTIC_RUN_ID="none", RANK=rank, LOCAL_RANK=local, GROUP_RANK=node, WORLD_SIZE=world,
        LOCAL_WORLD_SIZE=per_node)


def srun(env, rank, local, node, tasks, per_node, nodes, job="train.sh"):
    env(SLURM_NTASKS=tasks, SLURM_NTASKS_PER_NODE=per_node, SLURM_NNODES=nodes, SLURM_PROCID=rank,
        SLURM_LOCALID=local, SLURM_NODEID=node, SLURM_JOB_NAME=job)


def test_a_process_started_alone(env):
    assert current() == Launch("none", 1, 0, 0, 0)
    assert current().is_first


def test_torchrun_ranks(env):
    torchrun(env, rank=5, local=1, node=1, world=8, per_node=4)
    assert current() == Launch("torchrun", 8, 5, 1, 1, 4, 2)
    assert not current().is_first
    torchrun(env, rank=0, local=0, node=0, world=8, per_node=4)
    assert current().is_first


def test_srun_ranks_and_an_interactive_job_is_no_launch(env):
    srun(env, rank=3, local=1, node=1, tasks=4, per_node=2, nodes=2)
    assert current() == Launch("srun", 4, 3, 1, 1, 2, 2)
    assert not current().is_first
    env(SLURM_JOB_NAME="interactive")  # `srun --pty bash` on an allocation: the command runs alone
    assert current().launcher == "none" and current().is_first


def test_torchrun_inside_an_allocation_is_torchrun(env):
    srun(env, rank=0, local=0, node=0, tasks=2, per_node=1, nodes=2)  # srun starts one torchrun per node
    torchrun(env, rank=3, local=1, node=1, world=4, per_node=2)
    assert current().launcher == "torchrun" and current().rank == 3


def test_lightnings_launcher_on_the_first_and_another_node(env):
    env(LOCAL_RANK=2, WORLD_SIZE=4)  # a copy Lightning started
    assert current() == Launch("lightning", 4, 2, 2, 0)
    env(LOCAL_RANK=0, NODE_RANK=1)  # the command run by hand on a second node: its global rank is unknown
    launch = current()
    assert launch.rank is None and not launch.is_first


def test_lightning_finds_the_same_ranks(env):
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    torchrun(env, rank=5, local=1, node=1, world=8, per_node=4)
    lightning = TorchElasticEnvironment()
    assert (lightning.global_rank(), lightning.local_rank(), lightning.node_rank(), lightning.world_size()) == \
           (current().rank, current().local_rank, current().node_rank, current().world_size)
    env.clear()
    srun(env, rank=3, local=1, node=1, tasks=4, per_node=2, nodes=2)
    assert SLURMEnvironment.detect()
    lightning = SLURMEnvironment()
    assert (lightning.global_rank(), lightning.local_rank(), lightning.node_rank(), lightning.world_size()) == \
           (current().rank, current().local_rank, current().node_rank, current().world_size)
    env(SLURM_JOB_NAME="bash")
    assert not SLURMEnvironment.detect() and current().launcher == "none"


@pytest.mark.parametrize("launcher, devices, nodes, key, message", [
    ("torchrun", 8, 1, "train.devices", "8, but torchrun started 2 processes per node (--nproc-per-node); set "
                                        "train.devices=2"),
    ("torchrun", 2, 1, "train.num_nodes", "1, but torchrun runs on 2 node(s); set train.num_nodes=2"),
    ("srun", 4, 2, "train.devices", "4, but srun started 2 processes per node (--ntasks-per-node); set "
                                    "train.devices=2"),
    ("srun", 2, 1, "train.num_nodes", "1, but srun runs on 2 node(s); set train.num_nodes=2"),
])
def test_process_counts_that_differ_from_the_launch_name_the_key(env, launcher, devices, nodes, key, message):
    if launcher == "torchrun":
        torchrun(env, rank=0, local=0, node=0, world=4, per_node=2)
    else:
        srun(env, rank=0, local=0, node=0, tasks=4, per_node=2, nodes=2)
    with pytest.raises(ConfigError) as info:
        check_launch(devices, nodes)
    assert (info.value.key, info.value.message) == (key, message)
    check_launch(2, 2)  # the counts the launcher started


def test_the_launch_check_runs_where_a_command_checks_its_accelerator(env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torchrun(env, rank=1, local=1, node=0, world=2, per_node=2)
    with pytest.raises(ConfigError, match=r"^train\.devices: 1, but torchrun started 2 processes per node"):
        check_accelerator("cpu", 1, strategy="ddp")
    with pytest.raises(ConfigError, match=r"^train\.devices: 1, but torchrun"):
        check_accelerator("cpu", "auto", strategy="ddp")  # auto on a CPU is one process, as Lightning resolves it
    check_accelerator("cpu", 2, strategy="ddp")
    env(WORLD_SIZE=3)  # uneven nodes: the product is checked
    with pytest.raises(ConfigError, match=r"^train\.num_nodes: |^train\.devices: train\.devices x"):
        check_accelerator("cpu", 2, strategy="ddp")


def test_srun_with_ntasks_only_is_refused(env):
    env(SLURM_NTASKS=4, SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NODEID=0, SLURM_JOB_NAME="train.sh")
    with pytest.raises(ConfigError, match=r"^train\.devices: srun started 4 tasks with --ntasks, which Lightning "
                                          r"does not read; start them with --ntasks-per-node"):
        check_launch(4, 1)


def test_auto_device_is_the_local_rank_gpu(env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    srun(env, rank=3, local=3, node=0, tasks=4, per_node=4, nodes=1)
    assert resolve_device("auto") == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1: each task sees its own
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"^train\.devices: 4 GPUs per node, but torch sees 1 CUDA device\(s\); "
                                          r"srun --gpus-per-task .* use --gpus-per-node$"):
        check_accelerator("gpu", 4, strategy="ddp")


def test_a_launch_variable_that_is_not_a_number_is_named(env):
    torchrun(env, rank="x", local=0, node=0, world=2, per_node=2)
    with pytest.raises(ConfigError, match=r"^RANK: environment variable RANK='x' is not an integer"):
        current()


JOIN = """
import torch, torch.distributed as dist
from sgdm.launch import process_group, rank_world
with process_group() as joined:
    assert joined
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    print("joined", *rank_world(), int(value.item()))
assert not dist.is_initialized()
"""


def test_the_process_group_srun_started_is_joined(tmp_path):
    import os
    import sys

    from tests.launchers import srun_tasks

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("MASTER_")}
    procs = srun_tasks([sys.executable, "-c", JOIN], env, "annotate.sh")
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [o.strip().splitlines()[-1] for o in outputs] == ["joined 0 2 3", "joined 1 2 3"]


def test_a_command_on_the_cpu_joins_with_gloo_where_cuda_is_present(monkeypatch):
    # NCCL would refuse more processes on a node than GPUs for a CPU evaluation or annotation
    import torch

    from sgdm.launch import _backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [_backend(d) for d in (None, "auto", "cuda", "cuda:1", "cpu")] == ["nccl"] * 4 + ["gloo"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert {_backend(d) for d in (None, "auto", "cpu")} == {"gloo"}
