"""train-autoencoder: what it checks before any work, and its training step."""
from __future__ import annotations

import pytest

from sgdm.cli.main import main
from tests.training.helpers import tiny_config, write_config


def _ae_config(tmp_path, **autoencoder):
    ae = {"checkpoint": str(tmp_path / "ae.ckpt"), "loss": {"perceptual_weight": 0.0, "disc_start": 2}}
    ae.update(autoencoder)
    return tiny_config(tmp_path, model={"guidance": {"kind": "none", "num_classes": 0, "drop_prob": 0.0},
                                        "autoencoder": ae}, train={"max_steps": 2})


def test_new_run_refuses_to_overwrite_an_existing_checkpoint(tmp_path, capsys):
    """A config that names a downloaded first stage (the paper configs' checkpoints/kl-f8.ckpt) must not
    have it replaced by a newly trained autoencoder at the end of the run."""
    path = write_config(tmp_path, _ae_config(tmp_path))
    (tmp_path / "ae.ckpt").write_bytes(b"pretrained weights")
    assert main(["train-autoencoder", str(path), "run.name=ae"]) == 2
    err = capsys.readouterr().err
    assert "config error: model.autoencoder.checkpoint: " in err and "ae.ckpt already exists" in err, err
    assert (tmp_path / "ae.ckpt").read_bytes() == b"pretrained weights"
    assert not (tmp_path / "runs" / "ae").exists()  # refused before the run directory is written
