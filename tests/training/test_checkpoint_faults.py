"""Faults while writing a run's files: a full disk during a checkpoint, a sample grid cut short, a torn
newest checkpoint on resume (CPU, tiny model)."""
from __future__ import annotations

import errno
import os
import pathlib

import pytest
import torch

from sgdm.training.checkpoint import checkpoint_name, is_valid_checkpoint, list_checkpoints
from tests.training.helpers import (assert_same_training_state, label_workdir, run_checkpoint, run_in_process,
                                    tiny_config)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    yield from label_workdir(tmp_path_factory, "faults")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_and_names_the_file(workdir, monkeypatch, where):
    """ENOSPC while step 4's checkpoint is written (in the write, or only at fsync as NFS reports it): the
    error names the file, step 2's checkpoint is untouched and nothing half-written is left; a resume once
    there is room again ends where an uninterrupted run does."""
    import sgdm.atomic as atomic

    common = {"max_steps": 6, "checkpoint_every": 2}
    cfg = tiny_config(workdir, run={"name": f"enospc-{where}"}, train=common)
    ckpt_dir = pathlib.Path(cfg["run"]["dir"]) / cfg["run"]["name"] / "checkpoints"
    real_save, real_fsync = torch.save, os.fsync

    def save(obj, f, *args, **kwargs):
        if not list_checkpoints(ckpt_dir) or where != "write":
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 a first part of the archive")
        _no_space()

    def fsync(fd):
        if list_checkpoints(ckpt_dir) and where == "fsync" and not os.path.isdir(f"/proc/self/fd/{fd}"):
            _no_space()
        return real_fsync(fd)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    second = ckpt_dir / checkpoint_name(2)
    with pytest.raises(OSError, match=rf"{checkpoint_name(4)}.*No space left on device") as caught:
        run_in_process(cfg)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert [p.name for p in ckpt_dir.iterdir()] == [second.name]  # no step 4, no temporary file
    assert is_valid_checkpoint(second)
    assert run_in_process(cfg, resume=True) == 0
    straight = tiny_config(workdir, run={"name": f"enospc-straight-{where}"}, train=common)
    assert run_in_process(straight) == 0
    assert_same_training_state(run_checkpoint(straight, 6), run_checkpoint(cfg, 6))


def test_a_sample_grid_cut_short_leaves_no_file(tmp_path, monkeypatch):
    """A grid is drawn after the step's checkpoint; a resume does not draw it again, so a torn PNG (a
    SIGKILL, a full disk) would stay in samples/ for good. It is written atomically."""
    from PIL import Image

    from sgdm.training.sample_grid import save_grid

    def torn_save(self, fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)):
            fp = open(fp, "wb")
        fp.write(b"\x89PNG\r\n\x1a\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", torn_save)
    path = tmp_path / "samples" / "step-00000004.png"
    with pytest.raises(OSError):
        save_grid(torch.zeros(2, 3, 4, 4), 2, path)
    assert not path.exists() and list(path.parent.iterdir()) == []
    monkeypatch.undo()
    save_grid(torch.zeros(2, 3, 4, 4), 2, path)
    with Image.open(path) as img:
        assert img.size == (8, 4)


def test_a_resume_past_a_torn_newest_checkpoint_says_which_file_it_passed_over(workdir, capsys):
    cfg = tiny_config(workdir, run={"name": "torn-newest"}, train={"max_steps": 4, "checkpoint_every": 2})
    assert run_in_process(cfg) == 0
    ckpt_dir = pathlib.Path(cfg["run"]["dir"]) / "torn-newest" / "checkpoints"
    newest = ckpt_dir / checkpoint_name(4)
    newest.write_bytes(newest.read_bytes()[:-100])  # torn: a disk fault after the rename
    capsys.readouterr()
    cfg["train"]["max_steps"] = 6
    assert run_in_process(cfg, resume=True) == 0
    err = capsys.readouterr().err
    assert f"{newest} fails its integrity check" in err and f"resuming from {ckpt_dir / checkpoint_name(2)}" in err


# `sgdm-ldm train CONFIG` whose torch.save raises ENOSPC (after writing a little) from its CALL-th call on:
# a disk that fills up. A script file, not `python -c`: Lightning starts the other DDP process by running
# the same file again.
FULL_DISK = r"""
import errno, os, sys
import torch
real, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] < int(sys.argv[1]):
        return real(obj, f, *args, **kwargs)
    f.write(b"PK\x03\x04 a first part")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
torch.save = save
from sgdm.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def test_ddp_a_full_disk_during_a_checkpoint_stops_every_rank_with_the_error(workdir):
    """Only rank 0 writes; the others wait in Lightning's barrier after the write. Rank 0 failing out of the
    write left them there (NCCL: until the process group's timeout; gloo: "Connection closed by peer"):
    every rank now learns of the failure and stops, rank 0 with the error naming the file."""
    import subprocess
    import sys

    from tests.training.helpers import cli_command, write_config

    cfg = tiny_config(workdir, run={"name": "enospc-ddp"},
                      train={"max_steps": 6, "batch_size": 4, "checkpoint_every": 2, "devices": 2, "strategy": "ddp"})
    driver = workdir / "full_disk.py"
    driver.write_text(FULL_DISK)
    config = write_config(workdir, cfg, "enospc-ddp.yaml")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(driver), "2", *cli_command(config)[3:]], env=env,
                          capture_output=True, text=True, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Connection closed by peer" not in output, output[-3000:]
    ckpt_dir = pathlib.Path(cfg["run"]["dir"]) / "enospc-ddp" / "checkpoints"
    assert f"could not write {ckpt_dir / checkpoint_name(4)}: No space left on device" in output, output[-3000:]
    assert "[rank1]: RuntimeError: sgdm: rank 0 could not write" in output, output[-3000:]
    assert [p.name for p in ckpt_dir.iterdir()] == [checkpoint_name(2)]
    assert is_valid_checkpoint(ckpt_dir / checkpoint_name(2))


def test_a_resume_with_only_torn_checkpoints_names_them(tmp_path):
    from sgdm.config.core import ConfigError, from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.training.checkpoint import atomic_torch_save
    from sgdm.training.run import prepare_run_dir

    cfg = from_dict(ExperimentConfig, tiny_config(tmp_path))
    prepare_run_dir(cfg, resume=False)
    ckpt = cfg.run.path / "checkpoints" / checkpoint_name(2)
    atomic_torch_save({"x": torch.ones(100)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-50])
    with pytest.raises(ConfigError, match=rf"no readable checkpoint .*{ckpt}"):
        prepare_run_dir(cfg, resume=True)
