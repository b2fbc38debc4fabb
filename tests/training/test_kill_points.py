"""A run killed at a chosen point (SIGKILL, SIGTERM, SIGINT), then started again with --auto-resume, ends
bit for bit where the uninterrupted run does (CPU, tiny model, latent cache and sample grids on)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from sgdm.training.checkpoint import list_checkpoints
from tests.training.helpers import assert_same_training_state, label_workdir, run_checkpoint, tiny_config, \
    write_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
STEPS = 6
TRAIN = {"max_steps": STEPS, "accumulate": 2, "checkpoint_every": 2, "cache_latents": True, "cache_shard_size": 4,
         "sample_every": 2}

# Runs `sgdm-ldm train CONFIG --auto-resume` with one function (MODULE, NAME) wrapped to send SIGNAL to this
# process the CALL-th time it runs (after writing part of a file where it writes one), as a scheduler, an OOM
# killer or a user would at that moment.
DRIVER = r"""
import functools, importlib, os, signal, sys
module, name, call, signame = sys.argv[1:5]
owner, _, attr = name.rpartition(".")
target = functools.reduce(getattr, owner.split(".") if owner else [], importlib.import_module(module))
real, calls = getattr(target, attr), [0]
def wrapped(*args, **kwargs):
    if attr == "save" and "samples" not in str(getattr(args[1], "name", args[1])):
        return real(*args, **kwargs)  # PIL's Image.save: only the sample grids count
    calls[0] += 1
    if calls[0] == int(call):
        if attr == "save" and signame == "SIGKILL":  # a PNG cut short where the grid is being written
            fp = args[1] if hasattr(args[1], "write") else open(args[1], "wb")
            fp.write(b"\x89PNG\r\n\x1a\n")
            fp.flush()
        if attr == "_write_shard" and signame == "SIGKILL":
            (args[0] / f".shard-{args[1]:05d}.safetensors.{os.getpid()}.tmp").write_bytes(b"partial")
        os.kill(os.getpid(), getattr(signal, signame))
    return real(*args, **kwargs)
setattr(target, attr, wrapped)
from sgdm.cli.main import main
sys.argv = ["sgdm-ldm", *sys.argv[5:]]
sys.exit(main())
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    yield from label_workdir(tmp_path_factory, "kill-points")


def _train(workdir, cfg: dict, *fault: str) -> subprocess.CompletedProcess:
    config = write_config(workdir, cfg, f"{cfg['run']['name']}.yaml")
    command = [sys.executable, "-c", DRIVER, *fault, "train", str(config), "--auto-resume"] if fault else \
        [sys.executable, "-m", "sgdm.cli.main", "train", str(config), "--auto-resume"]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(workdir):
    cfg = tiny_config(workdir, run={"name": "reference"}, train=TRAIN)
    proc = _train(workdir, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_checkpoint(cfg, STEPS)


@pytest.mark.parametrize("point, signame, code", [
    (("sgdm.training.latent_cache", "_write_shard", "3"), "SIGKILL", -9),  # building the latent cache
    (("sgdm.training.latent_cache", "_write_shard", "3"), "SIGTERM", -15),  # (before training: no checkpoint)
    (("sgdm.training.module", "update_ema", "3"), "SIGKILL", -9),  # in the EMA update of step 2
    (("sgdm.training.module", "update_ema", "3"), "SIGTERM", 143),
    (("sgdm.training.module", "update_ema", "3"), "SIGINT", 130),  # Ctrl+C: a checkpoint, as SIGTERM
    (("PIL.Image", "Image.save", "2"), "SIGKILL", -9),  # writing step 4's sample grid
    (("PIL.Image", "Image.save", "2"), "SIGTERM", 143),
    (("sgdm.training.checkpoint", "atomic_torch_save", "2"), "SIGKILL", -9),  # writing step 4's checkpoint
], ids=lambda v: v[1] if isinstance(v, tuple) else str(v))
def test_killed_at_a_point_then_started_again_ends_as_the_uninterrupted_run(workdir, reference, point, signame,
                                                                             code):
    name = f"{point[1]}-{signame}"
    cfg = tiny_config(workdir, run={"name": name}, train=TRAIN)
    proc = _train(workdir, cfg, *point, signame)
    assert proc.returncode == code, proc.stderr[-3000:]
    if code in (130, 143):
        by = "Ctrl+C" if code == 130 else "SIGTERM"
        assert f"sgdm: stopped by {by} at step " in proc.stderr, proc.stderr[-3000:]
    run = pathlib.Path(cfg["run"]["dir"]) / name
    assert not [s for s, _ in list_checkpoints(run / "checkpoints") if s >= STEPS]
    proc = _train(workdir, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training_state(reference, run_checkpoint(cfg, STEPS))
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    # every grid a complete PNG: one drawn again, or one written whole before the signal
    from PIL import Image

    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == [f"step-{s:08d}.png" for s in (2, 4, 6)]
    for grid in grids:
        with Image.open(run / "samples" / grid) as img:
            img.load()
