"""DDP with 2 CPU processes (gloo) matches one process with the same global batch, whether Lightning, torchrun
or srun starts them."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from tests.launchers import TORCHRUN, srun_tasks
from tests.training.helpers import cli_command, load_checkpoint, make_label_store, run_in_process, tiny_config, \
    write_config


STEPS = 12
TRAIN = {"max_steps": STEPS, "batch_size": 4, "checkpoint_every": STEPS}
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """A one-process run of STEPS steps (its checkpoint) and the folder its label store lives in."""
    tmp_path = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_label_store(tiny_config(tmp_path))
        assert run_in_process(tiny_config(tmp_path, run={"name": "single"}, train=TRAIN)) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp_path, load_checkpoint(tmp_path / "runs" / "single" / "checkpoints" / f"step-{STEPS:08d}.ckpt")


def _run(command: list[str], launcher: str) -> tuple[int, str]:
    if launcher == "torchrun":
        command = [*TORCHRUN, *command[1:]]
    proc = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=400)
    return proc.returncode, proc.stdout + proc.stderr


def _srun(command: list[str], log, stop_after=None) -> list[int]:
    """Two tasks as srun starts them, with the variables it sets (Lightning's SLURMEnvironment reads them);
    ``stop_after``: a checkpoint folder whose first checkpoint makes both get SIGTERM, as SLURM sends it
    to every task at the time limit. Their exit codes."""
    procs = srun_tasks(command, ENV, "train.sh", stdout=log)
    if stop_after is not None:
        deadline = time.monotonic() + 300
        while not (stop_after.is_dir() and any(stop_after.glob("step-*.ckpt"))) and time.monotonic() < deadline \
                and all(p.poll() is None for p in procs):
            time.sleep(0.01)
        for p in procs:
            p.send_signal(signal.SIGTERM)
    return [p.wait(timeout=400) for p in procs]


def _assert_matches(single: dict, run) -> None:
    b = load_checkpoint(run / "checkpoints" / f"step-{STEPS:08d}.ckpt")
    assert single["sgdm"] == b["sgdm"]
    for key, value in single["state_dict"].items():
        # same samples, noise and dropout; only the order of float sums (all-reduce) differs
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_ddp_two_cpu_processes_match_a_single_process(single_run, launcher):
    # lightning: train.devices=2 makes the command start its second process itself
    tmp_path, single = single_run
    ddp = tiny_config(tmp_path, run={"name": f"ddp-{launcher}"}, train={**TRAIN, "devices": 2, "strategy": "ddp"})
    code, output = _run(cli_command(write_config(tmp_path, ddp, f"ddp-{launcher}.yaml")), launcher)
    assert code == 0, output[-3000:]
    # torchrun's processes join their group before reading the data (sgdm.cli.train), Lightning's in Trainer.fit
    assert ("sgdm: the 2 processes torchrun started joined" if launcher == "torchrun" else
            "Starting with 2 processes") in output
    _assert_matches(single, tmp_path / "runs" / f"ddp-{launcher}")


def test_srun_tasks_stopped_by_sigterm_and_started_again_match_a_single_process(single_run):
    """The scheduler's cycle: srun starts two tasks, the time limit's SIGTERM reaches both (a checkpoint,
    exit 143), and the same command with --auto-resume finishes the run."""
    tmp_path, single = single_run
    ddp = tiny_config(tmp_path, run={"name": "ddp-srun"}, train={**TRAIN, "devices": 2, "strategy": "ddp",
                                                                  "checkpoint_every": 2})
    command = cli_command(write_config(tmp_path, ddp, "ddp-srun.yaml"), "--auto-resume")
    checkpoints = tmp_path / "runs" / "ddp-srun" / "checkpoints"
    with open(tmp_path / "ddp-srun.log", "w+") as log:
        codes = _srun(command, log, stop_after=checkpoints)
        stopped = max(int(p.stem.split("-")[1]) for p in checkpoints.glob("step-*.ckpt"))
        if stopped < STEPS:  # the signal came before the end (the run is short, so it may not)
            assert codes == [143, 143]
        assert _srun(command, log) == [0, 0]
        log.seek(0)
        output = log.read()
    assert output.count("sgdm: the 2 processes srun started joined their process group (gloo)") == 2  # each start
    assert not [p.name for p in checkpoints.iterdir() if not p.name.startswith("step-")]  # no hpc_ckpt, no .tmp
    _assert_matches(single, tmp_path / "runs" / "ddp-srun")


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
