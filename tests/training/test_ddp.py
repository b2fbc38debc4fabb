"""DDP with 2 CPU processes (gloo) matches one process with the same global batch."""
from __future__ import annotations

import os
import subprocess

import torch

from tests.training.helpers import cli_command, load_checkpoint, make_label_store, run_in_process, tiny_config, \
    write_config


def test_ddp_two_cpu_processes_match_a_single_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_label_store(tiny_config(tmp_path))
        train = {"max_steps": 3, "batch_size": 4, "checkpoint_every": 3}
        single = tiny_config(tmp_path, run={"name": "single"}, train=train)
        assert run_in_process(single) == 0
    finally:
        torch.set_num_threads(threads)
    ddp = tiny_config(tmp_path, run={"name": "ddp"}, train={**train, "devices": 2, "strategy": "ddp"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cli_command(write_config(tmp_path, ddp, "ddp.yaml")), env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    a = load_checkpoint(tmp_path / "runs" / "single" / "checkpoints" / "step-00000003.ckpt")
    b = load_checkpoint(tmp_path / "runs" / "ddp" / "checkpoints" / "step-00000003.ckpt")
    assert a["sgdm"] == b["sgdm"]
    for key, value in a["state_dict"].items():
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
