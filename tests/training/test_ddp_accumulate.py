"""Gradient accumulation under DDP: one all-reduce of the gradients per optimiser step, not one per
micro-batch (DDP's no_sync on all but the last micro-batch), with the same result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from tests.training.helpers import make_label_store, run_checkpoint, run_in_process, tiny_config

# One process, strategy ddp: the module is wrapped in DistributedDataParallel (gloo) with its reducer and
# hooks, as under several processes; a comm hook counts the buckets all-reduced.
SCRIPT = textwrap.dedent("""
    import json, sys
    import pytorch_lightning as pl
    import torch
    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.training.run import train

    class CountAllReduces(pl.Callback):
        calls = 0

        def on_train_start(self, trainer, module):
            def hook(state, bucket):
                CountAllReduces.calls += 1
                fut = torch.futures.Future()
                fut.set_result(bucket.buffer())  # world size 1: the sum is the bucket
                return fut
            trainer.strategy.model.register_comm_hook(None, hook)

    cfg = json.loads(sys.argv[1])
    assert train(from_dict(ExperimentConfig, cfg), callbacks=[CountAllReduces()]) == 0
    print("ALLREDUCES", CountAllReduces.calls)
""")


def _all_reduces(tmp_path, accumulate: int) -> tuple[int, dict]:
    cfg = tiny_config(tmp_path, run={"name": f"acc{accumulate}"},
                      train={"max_steps": 3, "batch_size": 4, "accumulate": accumulate, "checkpoint_every": 3,
                             "strategy": "ddp"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cfg)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    calls = int(proc.stdout.rsplit("ALLREDUCES", 1)[1].split()[0])
    ckpt = torch.load(tmp_path / "runs" / f"acc{accumulate}" / "checkpoints" / "step-00000003.ckpt",
                      map_location="cpu", weights_only=False)
    return calls, ckpt


def test_accumulated_micro_batches_all_reduce_once_per_step_and_train_as_without_ddp(tmp_path):
    make_label_store(tiny_config(tmp_path))
    once, _ = _all_reduces(tmp_path, 1)
    twice, ddp = _all_reduces(tmp_path, 2)
    assert once > 0
    assert twice == once  # 3 steps of 2 micro-batches: the buckets of 3 all-reduces, not 6

    cfg = tiny_config(tmp_path, run={"name": "plain"},
                      train={"max_steps": 3, "batch_size": 4, "accumulate": 2, "checkpoint_every": 3})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): a parallel reduction's order follows it
    try:
        assert run_in_process(cfg) == 0
    finally:
        torch.set_num_threads(threads)
    for key, value in run_checkpoint(cfg, 3)["state_dict"].items():
        # the same samples and noise; the sum of the micro-batches' gradients is taken in another order
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")
