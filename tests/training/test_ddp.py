"""DDP with 2 CPU processes (gloo) matches one process with the same global batch, whether Lightning, torchrun
or srun starts them."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.training.helpers import cli_command, load_checkpoint, make_label_store, run_in_process, tiny_config, \
    write_config


TRAIN = {"max_steps": 3, "batch_size": 4, "checkpoint_every": 3}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """A one-process run of 3 steps (its checkpoint) and the folder its label store lives in."""
    tmp_path = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_label_store(tiny_config(tmp_path))
        assert run_in_process(tiny_config(tmp_path, run={"name": "single"}, train=TRAIN)) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp_path, load_checkpoint(tmp_path / "runs" / "single" / "checkpoints" / "step-00000003.ckpt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, config, env) -> tuple[int, str]:
    """Two processes training ``config``, started as ``launcher`` starts them; exit code and output."""
    command = cli_command(config)
    if launcher == "lightning":  # train.devices=2: the command starts its second process itself
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
        return proc.returncode, proc.stdout + proc.stderr
    if launcher == "torchrun":
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               *command[1:]], env=env, capture_output=True, text=True, timeout=400)
        return proc.returncode, proc.stdout + proc.stderr
    # srun: one task a process, with the variables srun sets (Lightning's SLURMEnvironment reads them)
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_JOB_NAME": "train.sh", "SLURM_JOB_ID": "1234", "SLURM_NODELIST": "127.0.0.1",
             "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen(command, env={**env, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    return max(p.returncode for p in procs), "".join(outputs)


@pytest.mark.parametrize("launcher", ["lightning", "torchrun", "srun"])
def test_ddp_two_cpu_processes_match_a_single_process(single_run, launcher):
    tmp_path, single = single_run
    ddp = tiny_config(tmp_path, run={"name": f"ddp-{launcher}"}, train={**TRAIN, "devices": 2, "strategy": "ddp"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    code, output = _launch(launcher, write_config(tmp_path, ddp, f"ddp-{launcher}.yaml"), env)
    assert code == 0, output[-3000:]
    assert "Starting with 2 processes" in output
    run = tmp_path / "runs" / f"ddp-{launcher}"
    b = load_checkpoint(run / "checkpoints" / "step-00000003.ckpt")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003.ckpt"]  # no hpc_ckpt
    assert single["sgdm"] == b["sgdm"]
    for key, value in single["state_dict"].items():
        # same samples, noise and dropout; only the order of float sums (all-reduce) differs
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_autoencoder_trains_under_ddp_before_and_after_disc_start(tmp_path):
    """The discriminator gets no gradient before disc_start (and the autoencoder none in the
    discriminator's backward): plain DDP stops at step 2 on such parameters."""
    cfg = tiny_config(tmp_path, run={"name": "ae-ddp"},
                      model={"guidance": {"kind": "none", "num_classes": 0, "drop_prob": 0.0},
                             "autoencoder": {"checkpoint": str(tmp_path / "ae.ckpt"),
                                             "loss": {"perceptual_weight": 0.0, "disc_start": 2}}},
                      train={"max_steps": 3, "batch_size": 4, "checkpoint_every": 3, "devices": 2,
                             "strategy": "ddp"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = cli_command(write_config(tmp_path, cfg, "ae-ddp.yaml"), command="train-autoencoder")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    assert load_checkpoint(tmp_path / "runs" / "ae-ddp" / "checkpoints" / "step-00000003.ckpt")["sgdm"] == {"step": 3}
    assert (tmp_path / "ae.ckpt").is_file()
