"""Launch details: the GPU of a local rank beyond the GPUs a process sees, and the process
group of ``srun --ntasks`` (no ``--ntasks-per-node``) for annotate and eval."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from sgdm.config.core import ConfigError
from sgdm.launch import check_launch, local_gpu
from tests.config.test_launch import JOIN, LAUNCH_VARIABLES, env, srun, torchrun  # noqa: F401 - env: the fixture


def test_a_local_rank_beyond_the_visible_gpus_is_named_not_left_to_cuda(env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    torchrun(env, rank=3, local=3, node=0, world=4, per_node=4)  # 4 processes on a node showing 2 GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match=r"^LOCAL_RANK: this process is local rank 3 of its node, but it sees 2 "
                                          r"GPU\(s\) \(CUDA_VISIBLE_DEVICES='0,1'\): start at most 2 processes"):
        local_gpu()
    env.clear()
    srun(env, rank=2, local=2, node=0, tasks=4, per_node=4, nodes=1)  # srun --gpus-per-task=2
    with pytest.raises(ConfigError, match=r"^SLURM_LOCALID: this process is local rank 2 .* --gpus-per-task=1"):
        local_gpu()
    env(SLURM_LOCALID=1)
    assert local_gpu() == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a GPU of its own
    env(SLURM_LOCALID=3)
    assert local_gpu() == 0


def test_srun_main_address_is_lightnings_without_its_check_of_ntasks_per_node(env, monkeypatch):
    from sgdm.launch import _slurm_main_address

    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    env(SLURM_NTASKS=4, SLURM_PROCID=1, SLURM_LOCALID=1, SLURM_NODEID=0, SLURM_JOB_NAME="eval.sh",
        SLURM_JOB_ID=987654, SLURM_NODELIST="gpu[17-18],gpu20")
    assert _slurm_main_address() == ("gpu17", 15000 + 7654)
    env(MASTER_ADDR="10.0.0.5", MASTER_PORT=29400)
    assert _slurm_main_address() == ("10.0.0.5", 29400)
    with pytest.raises(ConfigError, match="with --ntasks, which Lightning does not read"):
        check_launch(4, 1)  # training still needs --ntasks-per-node


def test_srun_ntasks_without_ntasks_per_node_joins_for_annotate_and_eval():
    """``srun --ntasks 2`` (no --ntasks-per-node): Lightning's SLURMEnvironment refuses it, which a training
    run needs; annotate and eval need only the ranks, and join."""
    from tests.launchers import srun_tasks

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("MASTER_")}
    procs = srun_tasks([sys.executable, "-c", JOIN], env, "eval.sh", per_node=False)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [o.strip().splitlines()[-1] for o in outputs] == ["joined 0 2 3", "joined 1 2 3"]


def test_a_sigterm_after_the_last_checkpoint_finds_the_run_complete(tmp_path, capsys):
    """Between the last checkpoint (on_train_end) and the end of fit, Lightning's handler was given back: a
    SIGTERM there ran its collective inside the handler and made the finished run exit 143 ("stopped by
    SIGTERM", no export). sgdm's handler stays until fit's teardown, which gives back the one from before."""
    import signal

    import pytorch_lightning as pl

    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.training.run import train
    from tests.training.helpers import make_label_store, tiny_config

    class KillAfterLastCheckpoint(pl.Callback):  # after StepCheckpoint's on_train_end: the checkpoint is written
        def on_train_end(self, trainer, module):
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    make_label_store(tiny_config(tmp_path))
    cfg = tiny_config(tmp_path, run={"name": "late-sigterm"}, train={"max_steps": 2, "checkpoint_every": 2})
    assert train(from_dict(ExperimentConfig, cfg), callbacks=[KillAfterLastCheckpoint()]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
    assert "stopped by SIGTERM" not in capsys.readouterr().err
    assert (tmp_path / "runs" / "late-sigterm" / "checkpoints" / "step-00000002.ckpt").is_file()
