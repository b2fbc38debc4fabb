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



def test_sample_cli_refuses_an_out_it_cannot_write_before_sampling(trained, capsys, monkeypatch):
    """-o x.jpg made a folder named x.jpg; -o under a file, or an existing file as the folder, ended in a
    traceback once the images were sampled."""
    import sgdm.cli.sample as sample_cli

    tmp, _ = trained
    run = tmp / "runs" / "ldm"
    monkeypatch.setattr(sample_cli, "_sample", lambda args: pytest.fail("sampled before checking --out"))
    (tmp / "a-file").write_text("")
    for out, says in ((tmp / "x.jpg", f"--out: {tmp / 'x.jpg'}: sample writes a .png grid, or a folder of PNG files; "
                                      f"name a .png file ({tmp / 'x.png'}) or a folder"),
                      (tmp / "a-file", f"--out: {tmp / 'a-file'} is an existing file; name a folder"),
                      (tmp / "a-file" / "g.png", f"--out: cannot write {tmp / 'a-file' / 'g.png'}: {tmp / 'a-file'} "
                                                 f"is a file, not a folder")):
        assert main(["sample", str(run), "--steps", "2", "-o", str(out)]) == 2
        assert f"sgdm-ldm sample: config error: {says}" in capsys.readouterr().err
    assert not (tmp / "x.jpg").exists()

@pytest.mark.parametrize("flag", ["--num-images", "--steps", "--batch-size", "--per-row"])
def test_sample_cli_counts_must_be_positive(trained, capsys, flag):
    tmp, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(tmp / "runs" / "ldm"), flag, "0", "-o", str(tmp / "never.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "expected an integer >= 1, got 0" in err, err


@pytest.mark.parametrize("seed", ["18446744073709551616", "-1", "x"])
def test_sample_cli_seed_out_of_range_names_the_flag(trained, capsys, seed):
    tmp, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(tmp / "runs" / "ldm"), "--seed", seed, "-o", str(tmp / "never.png")])
    assert exit_info.value.code == 2
    assert "argument --seed" in capsys.readouterr().err


def test_sample_cli_bad_input_is_one_line_naming_it(trained, tmp_path, capsys):
    """Bad input to `sample` is an error line naming the argument and exit code 1, not a traceback,
    and writes nothing."""
    tmp, _ = trained
    run = str(tmp / "runs" / "ldm")
    out = tmp_path / "never.png"
    garbage = tmp_path / "mask.png"
    garbage.write_bytes(b"not a png")
    Image.new("RGB", (16, 16)).save(tmp_path / "rgb.png")
    torch.save({"mask": torch.zeros(16, 16, dtype=torch.long)}, tmp_path / "dict.pt")
    import numpy as np

    np.save(tmp_path / "float_ids.npy", np.zeros((16, 16), np.float32))
    np.save(tmp_path / "bool_ids.npy", np.zeros((16, 16), bool))  # `ids > 0`, a region meant as a class map
    cases = [
        ([str(tmp_path / "missing-run")], "missing-run: no such file or directory"),
        ([run, "--cluster", "0"], "--cluster: this model has 'none' guidance"),  # unguided: takes no cluster
        ([run, "--mask", str(tmp_path / "none.png")], "--mask: file"),
        ([run, "--mask", str(garbage)], "cannot be read as a class map"),
        ([run, "--mask", str(tmp_path / "rgb.png")], "an image of mode RGB is not a class map; save the class ids as a"),
        ([run, "--mask", str(tmp_path / "dict.pt")], "dict.pt holds a dict, not a tensor"),
        ([run, "--mask", str(tmp_path / "float_ids.npy")], "holds a 2-D torch.float32 array; a class map holds"),
        ([run, "--mask", str(tmp_path / "bool_ids.npy")], "holds a 2-D torch.bool array; a class map holds"),
        ([run, "--guidance-scale", "2"], "--guidance-scale: this model is unguided"),
        ([run, "--eta", "1.5"], "--eta: expected a number in [0, 1]"),
    ]
    for argv, message in cases:
        assert main(["sample", *argv, "--steps", "1", "-n", "1", "-o", str(out)]) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("sgdm-ldm sample: error: ") and message in err, (argv, err)
        assert "Traceback" not in err and err.count("\n") == 1, err
    # a device this machine cannot have: a flag error (exit 2), as for a bad config key
    devices = [("cpu:x", "--device: expected auto, cpu, cuda or cuda:N, got 'cpu:x'")]
    if not torch.cuda.is_available():
        devices.append(("cuda", "--device: 'cuda', but torch sees no CUDA device on this machine"))
    devices.append((f"cuda:{torch.cuda.device_count()}", "CUDA device"))
    for device, message in devices:
        assert main(["sample", run, "--device", device, "-n", "1", "-o", str(out)]) == 2, device
        err = capsys.readouterr().err
        assert err.startswith("sgdm-ldm sample: config error: ") and message in err, (device, err)
    assert not out.exists()


def test_sample_a_run_without_its_pipeline_export_from_its_newest_checkpoint(trained, capsys):
    """A stopped run has checkpoints but no pipeline/: the newest valid checkpoint's EMA weights
    are what training would have exported there."""
    import shutil

    from sgdm.pipeline import SelfGuidedPipeline
    from sgdm.training.export import checkpoint_for, pipeline_from_checkpoint

    tmp, _ = trained
    run = tmp / "runs" / "ldm"
    partial = tmp / "runs" / "partial"
    shutil.copytree(run, partial, ignore=shutil.ignore_patterns("pipeline"))
    ckpt = partial / "checkpoints" / "step-00000002.ckpt"
    assert checkpoint_for(run) is None and checkpoint_for(partial) == ckpt
    pipe, step = pipeline_from_checkpoint(ckpt)
    exported = SelfGuidedPipeline.from_pretrained(run)  # written by training at step 2
    assert step == 2
    for mine, theirs in ((pipe.unet, exported.unet), (pipe.autoencoder, exported.autoencoder)):
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in mine.state_dict().items())
    assert main(["sample", str(run), "-n", "2", "--steps", "2", "-o", str(tmp / "exported.png")]) == 0
    for target in (partial, ckpt):
        out = tmp / f"from-{target.name}.png"
        assert main(["sample", str(target), "-n", "2", "--steps", "2", "-o", str(out)]) == 0
        assert f"EMA weights of {ckpt} (step 2)" in capsys.readouterr().err
        assert Image.open(out).tobytes() == Image.open(tmp / "exported.png").tobytes()
    # eval takes the same weights from a run without its export
    from sgdm.evaluation.evaluate import load_run

    _, evaluated = load_run(partial)
    assert f"EMA weights of {ckpt} (step 2" in capsys.readouterr().err
    assert all(torch.equal(v, exported.unet.state_dict()[k]) for k, v in evaluated.unet.state_dict().items())
    (partial / "config.yaml").unlink()
    assert main(["sample", str(ckpt), "-n", "1", "--steps", "1", "-o", str(tmp / "never.png")]) == 1
    assert "config.yaml beside it" in capsys.readouterr().err


def test_a_copied_run_whose_recorded_eval_weights_are_elsewhere_loads_from_its_checkpoint(trained):
    """A run copied from another machine records that machine's eval weights paths; sampling it from a
    checkpoint (no pipeline/ export) reads no eval weights, so it must not refuse them (as load_run does)."""
    import shutil

    import yaml

    from sgdm.training.export import pipeline_from_checkpoint

    tmp, _ = trained
    copied = tmp / "runs" / "copied"
    shutil.copytree(tmp / "runs" / "ldm", copied, ignore=shutil.ignore_patterns("pipeline"))
    recorded = yaml.safe_load((copied / "config.yaml").read_text())
    recorded.setdefault("eval", {})["inception_weights"] = "/elsewhere/pt_inception-2015-12-05-6726825d.pth"
    (copied / "config.yaml").write_text(yaml.safe_dump(recorded))
    pipe, step = pipeline_from_checkpoint(copied / "checkpoints" / "step-00000002.ckpt")
    assert step == 2 and pipe.unet is not None


def test_a_checkpoint_is_loaded_without_initialising_the_weights_it_replaces(trained, monkeypatch):
    """pipeline_from_checkpoint built and randomly initialised the UNet and first stage, then copied the
    checkpoint's weights over them (half of a large UNet's load time, twice its memory)."""
    from sgdm.pipeline import SelfGuidedPipeline
    from sgdm.training.export import pipeline_from_checkpoint

    tmp, _ = trained
    run = tmp / "runs" / "ldm"
    devices, reset = [], torch.nn.Conv2d.reset_parameters
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters",
                        lambda self: devices.append(self.weight.device.type) or reset(self))
    pipe, _ = pipeline_from_checkpoint(run / "checkpoints" / "step-00000002.ckpt")
    assert devices and set(devices) == {"meta"}
    exported = SelfGuidedPipeline.from_pretrained(run)
    for mine, theirs in ((pipe.unet, exported.unet), (pipe.autoencoder, exported.autoencoder)):
        state = mine.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in theirs.state_dict().items())
        assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in state.values())
    with torch.inference_mode():  # its weights taken as read would be inference tensors: never trainable
        pipe, _ = pipeline_from_checkpoint(run / "checkpoints" / "step-00000002.ckpt")
    assert not any(v.is_inference() for m in (pipe.unet, pipe.autoencoder) for v in m.state_dict().values())


def test_a_run_continued_past_its_export_is_sampled_from_its_newer_checkpoint(trained, capsys):
    """A finished run continued with a higher train.max_steps and stopped keeps the export of its
    earlier end: sample and eval used those old weights without a word. The export records its step."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from sgdm.training.export import checkpoint_for

    tmp, _ = trained
    run = tmp / "runs" / "ldm"
    with safe_open(str(run / "pipeline" / "model.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["step"] == "2" and checkpoint_for(run) is None  # up to date
    continued = tmp / "runs" / "continued"
    shutil.copytree(run, continued)
    newer = continued / "checkpoints" / "step-00000004.ckpt"
    shutil.copyfile(continued / "checkpoints" / "step-00000002.ckpt", newer)
    assert checkpoint_for(continued) == newer
    assert main(["sample", str(continued), "-n", "1", "--steps", "1", "-o", str(tmp / "continued.png")]) == 0
    assert f"EMA weights of {newer} (step 2)" in capsys.readouterr().err  # (its content is step 2's)
    newer.write_bytes(b"torn")  # an incomplete newer checkpoint: the export is the newest usable weights
    assert checkpoint_for(continued) is None
    # an export written before exports recorded their step is used as it is
    save_file(tensors, str(continued / "pipeline" / "model.safetensors"),
              metadata={k: v for k, v in meta.items() if k != "step"})
    shutil.copyfile(run / "checkpoints" / "step-00000002.ckpt", newer)
    assert checkpoint_for(continued) is None
