"""train-autoencoder writes a loadable first stage; sample writes grids and files from a run."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from sgdm.cli.main import main
from sgdm.config.schema import load_experiment
from tests.training.helpers import tiny_config, write_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ae")
    cfg = tiny_config(tmp, model={"guidance": {"kind": "none", "num_classes": 0, "drop_prob": 0.0},
                                  "autoencoder": {"checkpoint": str(tmp / "ae.ckpt"),
                                                  "loss": {"perceptual_weight": 0.0, "disc_start": 2}}},
                      train={"max_steps": 3, "logger": "csv", "log_every": 1, "export_pipeline": True})
    path = write_config(tmp, cfg)
    assert main(["train-autoencoder", str(path), "run.name=ae"]) == 0
    assert main(["train", str(path), "run.name=ldm", "train.max_steps=2"]) == 0
    return tmp, path


def test_autoencoder_trains_with_the_discriminator_and_loads(trained):
    from sgdm.models.checkpoints import load_autoencoder

    tmp, path = trained
    log = (tmp / "runs" / "ae" / "logs" / "metrics.csv").read_text().splitlines()
    header = log[0].split(",")
    factors = [row.split(",")[header.index("autoencoder/disc_factor")] for row in log[1:]]
    assert [float(f) for f in factors if f] == [0.0, 0.0, 1.0]  # disc_start = 2
    ae = load_autoencoder(tmp / "ae.ckpt", load_experiment(path).model.autoencoder)
    ckpt = torch.load(tmp / "runs" / "ae" / "checkpoints" / "step-00000003.ckpt", weights_only=False)
    for k, v in ae.state_dict().items():
        if k != "scale_factor":
            assert torch.equal(v, ckpt["state_dict"][f"autoencoder.{k}"]), k
    # the diffusion run used it (same first-stage weights) and computed the scale factor
    ldm = torch.load(tmp / "runs" / "ldm" / "checkpoints" / "step-00000002.ckpt", weights_only=False)
    assert torch.equal(ldm["state_dict"]["first_stage.encoder.conv_in.weight"], ae.state_dict()["encoder.conv_in.weight"])
    assert torch.isfinite(ldm["state_dict"]["first_stage.scale_factor"])


def test_sample_cli_grid_files_and_errors(trained, capsys):
    tmp, _ = trained
    run = tmp / "runs" / "ldm"
    assert main(["sample", str(run), "-n", "3", "--steps", "2", "--per-row", "2", "-o", str(tmp / "g.png")]) == 0
    assert Image.open(tmp / "g.png").size == (64, 64)
    assert main(["sample", str(run), "-n", "2", "--steps", "2", "-o", str(tmp / "files")]) == 0
    assert sorted(p.name for p in (tmp / "files").iterdir()) == ["00000.png", "00001.png"]
    a = Image.open(tmp / "files" / "00000.png").tobytes()
    assert main(["sample", str(run), "-n", "2", "--steps", "2", "-o", str(tmp / "again")]) == 0
    assert Image.open(tmp / "again" / "00000.png").tobytes() == a  # same seed, same image
    with pytest.raises(SystemExit):
        main(["sample", str(run), "--box", "0.1,0.2"])
    assert "expected 4 numbers" in capsys.readouterr().err
