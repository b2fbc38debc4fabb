"""Resuming a run whose circumstances changed since it started: a run directory of the other trainer, an
autoencoder file replaced in place, a checkpoint of another sgdm version, no saved config to compare with, a
finished run (CPU, tiny model). Single config edits: tests/training/test_config.py."""
from __future__ import annotations

import json
import types

import pytest
import torch

from sgdm.config.core import ConfigError, from_dict
from sgdm.config.schema import ExperimentConfig
from tests.training.helpers import label_workdir, run_checkpoint, run_in_process, tiny_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    yield from label_workdir(tmp_path_factory, "resume-changes")


def _checkpoint_state(module_class, **state) -> dict:
    """The ``sgdm`` state that ``module_class.on_save_checkpoint`` writes for a module with ``state``."""
    checkpoint: dict = {}
    module_class.on_save_checkpoint(types.SimpleNamespace(**state), checkpoint)
    return checkpoint


@pytest.mark.parametrize("written_by, trainer", [("autoencoder", "diffusion"), ("diffusion", "autoencoder")])
def test_a_resume_of_the_other_trainers_run_dir_is_refused_naming_both(tmp_path, written_by, trainer):
    """One config, two commands, the same run.name (the docs ask for another, a job script may forget):
    before, `train --resume` of the autoencoder's run stopped on a bare KeyError 'ema_updates', and
    `train-autoencoder --resume` of the denoiser's on a screenful of missing state_dict keys."""
    from sgdm.training.autoencoder import AutoencoderModule
    from sgdm.training.checkpoint import atomic_torch_save, checkpoint_name
    from sgdm.training.module import LatentDiffusionModule
    from sgdm.training.run import prepare_run_dir

    cfg = from_dict(ExperimentConfig, tiny_config(tmp_path))
    prepare_run_dir(cfg, resume=False, trainer=written_by)
    saved = (_checkpoint_state(AutoencoderModule, step=2) if written_by == "autoencoder" else
             _checkpoint_state(LatentDiffusionModule, step=2, ema_updates=2, nan_skips=0, consecutive_nan=0))
    ckpt = cfg.run.path / "checkpoints" / checkpoint_name(2)
    atomic_torch_save(saved, ckpt)
    assert prepare_run_dir(cfg, resume=True, trainer=written_by) == ckpt  # its own trainer resumes it
    with pytest.raises(ConfigError) as err:
        prepare_run_dir(cfg, resume=True, trainer=trainer)
    commands = {"diffusion": "`sgdm-ldm train`", "autoencoder": "`sgdm-ldm train-autoencoder`"}
    assert err.value.key == "run.name"
    assert f"{ckpt} is a checkpoint of {commands[written_by]}, not of {commands[trainer]}" in str(err.value)
    # without --resume (the README's order: train-autoencoder, annotate, train): the first message says so too,
    # where it said only "pass --resume to continue it", which then failed as above
    with pytest.raises(ConfigError) as err:
        prepare_run_dir(cfg, resume=False, trainer=trainer)
    assert err.value.key == "run.name" and "--resume" not in str(err.value)
    assert f"is a checkpoint of {commands[written_by]}, not of {commands[trainer]}" in str(err.value)


def test_a_resume_trains_on_its_own_first_stage_when_the_autoencoder_file_was_replaced(workdir, capsys):
    """model.autoencoder.checkpoint rewritten in place after the run started (the autoencoder trained on):
    the run goes on with the first stage in its checkpoints, as an uninterrupted run would, and says so.
    Before, the latent cache was re-encoded with the new file while the run's scale factor, sample grids
    and export kept the old first stage: it trained on latents of another autoencoder, silently."""
    from sgdm.models.autoencoder import AutoencoderKL
    from sgdm.training.autoencoder import save_autoencoder

    file = workdir / "replaced-ae.ckpt"
    cfg = tiny_config(workdir, run={"name": "replaced-ae"}, model={"autoencoder": {"checkpoint": str(file)}},
                      train={"max_steps": 1, "checkpoint_every": 1, "cache_latents": True})
    ae_cfg = from_dict(ExperimentConfig, cfg).model.autoencoder
    save_autoencoder(AutoencoderKL(ae_cfg), file)
    assert run_in_process(cfg) == 0
    manifest = workdir / "runs" / "replaced-ae" / "latents" / "manifest.json"
    encoded_with = json.loads(manifest.read_text())["fingerprint"]
    first = run_checkpoint(cfg, 1)["state_dict"]
    save_autoencoder(AutoencoderKL(ae_cfg), file)  # other weights (another random draw), same path
    capsys.readouterr()
    cfg["train"]["max_steps"] = 2
    assert run_in_process(cfg, resume=True) == 0
    assert json.loads(manifest.read_text())["fingerprint"] == encoded_with  # the cache was kept, not re-encoded
    second = run_checkpoint(cfg, 2)["state_dict"]
    for key in (k for k in first if k.startswith("first_stage.")):
        assert torch.equal(first[key], second[key]), key
    err = capsys.readouterr().err
    assert f"model.autoencoder.checkpoint {file} holds other weights than the first stage" in err


def _saved_run(tmp_path):
    """A run directory with config.yaml and a checkpoint of step 2; its config."""
    from sgdm.training.checkpoint import atomic_torch_save, checkpoint_name
    from sgdm.training.run import prepare_run_dir

    cfg = from_dict(ExperimentConfig, tiny_config(tmp_path))
    prepare_run_dir(cfg, resume=False)
    atomic_torch_save({"x": 1}, cfg.run.path / "checkpoints" / checkpoint_name(2))
    return cfg


def test_a_refused_resume_names_every_differing_setting(tmp_path):
    """Several settings edited at once: the error names them all, not one per attempt."""
    from sgdm.training.run import prepare_run_dir

    _saved_run(tmp_path)
    edited = tiny_config(tmp_path, train={"lr": 2.0e-3, "ema_decay": 0.999}, run={"seed": 4})
    with pytest.raises(ConfigError) as err:
        prepare_run_dir(from_dict(ExperimentConfig, edited), resume=True)
    assert err.value.key == "run.seed" and "(3 -> 4)" in str(err.value)
    assert "(and train.lr, train.ema_decay)" in str(err.value)


def test_a_resume_without_the_saved_config_says_nothing_is_compared(tmp_path, capsys):
    """Checkpoints copied by hand into a new run directory: no config.yaml to compare with. The resume goes
    on (the weights are there), but says that a changed setting would go unnoticed."""
    from sgdm.training.run import prepare_run_dir

    cfg = _saved_run(tmp_path)
    (cfg.run.path / "config.yaml").unlink()
    capsys.readouterr()
    edited = from_dict(ExperimentConfig, tiny_config(tmp_path, run={"seed": 4}))
    assert prepare_run_dir(edited, resume=True) is not None
    assert f"sgdm: {cfg.run.path / 'config.yaml'} is missing" in capsys.readouterr().err
    assert (cfg.run.path / "config.yaml").is_file()  # written now: the next resume compares with it
    prepare_run_dir(edited, resume=True)
    assert "is missing" not in capsys.readouterr().err


def test_resuming_a_finished_autoencoder_run_says_there_is_nothing_to_train(tmp_path, capsys):
    """As `sgdm-ldm train` does: without it, only "wrote the autoencoder" showed, as if it had trained on."""
    from sgdm.training.autoencoder import train_autoencoder

    cfg = tiny_config(tmp_path, run={"name": "ae-finished"}, train={"max_steps": 1, "checkpoint_every": 1},
                      model={"autoencoder": {"checkpoint": str(tmp_path / "ae.ckpt"),
                                             "loss": {"perceptual_weight": 0.0, "disc_start": 2}}})
    assert train_autoencoder(from_dict(ExperimentConfig, cfg), resume=False) == 0
    capsys.readouterr()
    assert train_autoencoder(from_dict(ExperimentConfig, cfg), resume=True) == 0
    assert "is already at step 1 of train.max_steps=1: nothing to train" in capsys.readouterr().err


@pytest.mark.parametrize("trainer", ["diffusion", "autoencoder"])
def test_a_checkpoint_whose_weights_do_not_fit_stops_in_one_line_naming_them(workdir, trainer):
    """A checkpoint of another sgdm version, whose networks named a parameter otherwise: before, Lightning's
    strict load raised a RuntimeError with a traceback from inside trainer.fit."""
    from sgdm.training.autoencoder import train_autoencoder
    from sgdm.training.checkpoint import atomic_torch_save, checkpoint_name
    from tests.training.helpers import load_checkpoint

    name = f"other-version-{trainer}"
    cfg = tiny_config(workdir, run={"name": name}, train={"max_steps": 1, "checkpoint_every": 1},
                      model={"autoencoder": {"checkpoint": str(workdir / f"{name}.ckpt"),
                                             "loss": {"perceptual_weight": 0.0, "disc_start": 2}}})
    if trainer == "diffusion":
        cfg["model"]["autoencoder"]["checkpoint"] = None
    train = run_in_process if trainer == "diffusion" else \
        lambda c, resume=False: train_autoencoder(from_dict(ExperimentConfig, c), resume=resume)
    assert train(cfg) == 0
    path = workdir / "runs" / name / "checkpoints" / checkpoint_name(1)
    saved = load_checkpoint(path)
    renamed = sorted(saved["state_dict"])[-1]
    saved["state_dict"]["renamed." + renamed] = saved["state_dict"].pop(renamed)
    atomic_torch_save(saved, path)
    cfg["train"]["max_steps"] = 2
    with pytest.raises(ConfigError) as err:
        train(cfg, resume=True)
    assert err.value.key == "run.name"
    assert f"{path}: its weights do not fit" in str(err.value)
    assert f"missing: {renamed} (1); unexpected: renamed.{renamed} (1)" in str(err.value)
