"""Resuming a run whose dataset, annotation store or first-stage file moved (a dataset copied to node-local
scratch, a new path per cluster job): accepted when the new path holds what the run recorded at its last
start, refused naming the key, both paths and what differs when not, and for runs without the record
(CPU, tiny model; one end-to-end resume)."""
from __future__ import annotations

import shutil

import pytest

from sgdm.config.core import ConfigError, from_dict
from sgdm.config.schema import ExperimentConfig
from tests.training.helpers import tiny_config

UNGUIDED = {"kind": "none", "drop_prob": 0.0}


def _images(folder, n: int = 6):
    """``n`` distinct 32 px PNG files in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i, 255 - 40 * i, 7 * i)).save(folder / f"img_{i}.png")
    return folder


def _folder_config(tmp_path, root, **sections) -> dict:
    return tiny_config(tmp_path, data={"dataset": "image_folder", "root": str(root)}, model={"guidance": UNGUIDED},
                       **sections)


def _started(cfg: dict) -> ExperimentConfig:
    """A run of ``cfg`` started (config and records written) with a checkpoint of step 2."""
    from sgdm.training.checkpoint import atomic_torch_save, checkpoint_name
    from sgdm.training.run import prepare_run_dir

    experiment = from_dict(ExperimentConfig, cfg)
    assert prepare_run_dir(experiment, resume=False) is None
    atomic_torch_save({"x": 1}, experiment.run.path / "checkpoints" / checkpoint_name(2))
    return experiment


def _resume(cfg: dict):
    from sgdm.training.run import prepare_run_dir

    return prepare_run_dir(from_dict(ExperimentConfig, cfg), resume=True)


def test_a_dataset_copied_to_another_root_is_resumed_saying_so(tmp_path, capsys):
    """Before: `data.root differs from the run's saved config`, for every copy of the same images."""
    first, copy = tmp_path / "job-1" / "data", tmp_path / "job-2" / "data"
    _images(first)
    run = _started(_folder_config(tmp_path, first))
    assert (run.run.path / "dataset.json").is_file()
    shutil.copytree(first, copy)
    capsys.readouterr()
    assert _resume(_folder_config(tmp_path, copy)) is not None
    err = capsys.readouterr().err
    assert f"sgdm: data.root moved ({first} -> {copy}): accepted, it holds the same images" in err
    assert err.count("\n") == 1 and "num_images 6" in err
    with pytest.raises(ConfigError) as refused:  # with another setting changed, the move is named with it
        _resume(_folder_config(tmp_path, tmp_path / "job-3" / "data", run={"seed": 4}))
    assert refused.value.key == "run.seed" and "(and data.root)" in str(refused.value)
    shutil.rmtree(first)  # the next job resumes from the copy's record: nothing moved
    assert _resume(_folder_config(tmp_path, copy)) is not None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("change, differs", [
    (lambda root: (root / "img_5.png").unlink(), "1 removed (img_5.png)"),
    (lambda root: (root / "img_5.png").rename(root / "img_9.png"), "1 added (img_9.png), 1 removed (img_5.png)"),
])
def test_a_moved_dataset_of_other_images_is_refused_naming_what_differs(tmp_path, change, differs):
    first, copy = tmp_path / "a", tmp_path / "b"
    _images(first)
    run = _started(_folder_config(tmp_path, first))
    shutil.copytree(first, copy)
    change(copy)
    with pytest.raises(ConfigError) as err:
        _resume(_folder_config(tmp_path, copy))
    text = str(err.value)
    assert err.value.key == "data.root" and f"({str(first)!r} -> {str(copy)!r})" in text
    assert f"{copy} holds other images (the dataset's ids, in order, and their file sizes) than recorded in " \
           f"{run.run.path / 'dataset.json'}: {differs}" in text


def test_a_run_without_the_dataset_record_refuses_a_moved_root_saying_how_to_record_it(tmp_path):
    """Runs started by an older sgdm: nothing to compare with. The message says what to do."""
    first, copy = tmp_path / "a", tmp_path / "b"
    _images(first)
    run = _started(_folder_config(tmp_path, first))
    (run.run.path / "dataset.json").unlink()
    shutil.copytree(first, copy)
    with pytest.raises(ConfigError) as err:
        _resume(_folder_config(tmp_path, copy))
    assert err.value.key == "data.root" and f"{run.run.path / 'dataset.json'} is missing" in str(err.value)
    assert f"Resume once with the saved value (a symlink at {first} pointing to {copy} will do)" in str(err.value)
    assert _resume(_folder_config(tmp_path, first)) is not None  # as told: that start records it
    assert _resume(_folder_config(tmp_path, copy)) is not None


def test_a_moved_annotation_store_is_accepted_with_the_same_content_only(tmp_path, capsys):
    from tests.training.helpers import make_label_store

    cfg = tiny_config(tmp_path)
    make_label_store(cfg)
    run = _started(cfg)
    moved = tmp_path / "scratch" / "store"
    shutil.copytree(tmp_path / "store", moved)
    capsys.readouterr()
    assert _resume(tiny_config(tmp_path, annotation={"store": str(moved)})) is not None
    assert f"sgdm: annotation.store moved ({tmp_path / 'store'} -> {moved}): accepted" in capsys.readouterr().err
    other = tmp_path / "other"
    make_label_store(tiny_config(tmp_path, annotation={"store": str(other)}), num_classes=2)  # other labels
    with pytest.raises(ConfigError) as err:
        _resume(tiny_config(tmp_path, annotation={"store": str(other)}))
    assert err.value.key == "annotation.store" and f"-> {str(other)!r})" in str(err.value)
    assert f"{other} holds other annotations (the store's content digest) than recorded in " \
           f"{run.run.path / 'annotation_store.json'}: sha256 " in str(err.value)


def test_a_moved_first_stage_file_is_accepted_with_the_same_bytes_only(tmp_path, capsys):
    from sgdm.models.autoencoder import AutoencoderKL
    from sgdm.training.autoencoder import save_autoencoder

    file, moved, other = tmp_path / "ae.ckpt", tmp_path / "scratch" / "ae.ckpt", tmp_path / "other.ckpt"
    cfg = tiny_config(tmp_path, model={"autoencoder": {"checkpoint": str(file)}})
    ae_cfg = from_dict(ExperimentConfig, cfg).model.autoencoder
    save_autoencoder(AutoencoderKL(ae_cfg), file)
    run = _started(cfg)
    moved.parent.mkdir()
    shutil.copy(file, moved)
    capsys.readouterr()
    assert _resume(tiny_config(tmp_path, model={"autoencoder": {"checkpoint": str(moved)}})) is not None
    assert f"sgdm: model.autoencoder.checkpoint moved ({file} -> {moved}): accepted" in capsys.readouterr().err
    save_autoencoder(AutoencoderKL(ae_cfg), other)  # another random draw
    with pytest.raises(ConfigError) as err:
        _resume(tiny_config(tmp_path, model={"autoencoder": {"checkpoint": str(other)}}))
    assert err.value.key == "model.autoencoder.checkpoint"
    assert f"{other} holds other first-stage weights (the file's sha256) than recorded in " \
           f"{run.run.path / 'first_stage.json'}: sha256 " in str(err.value)


def test_a_preempted_run_resumes_training_on_a_copy_of_its_dataset(tmp_path, capsys):
    """End to end: one step on the dataset at one root, the next on its copy at another (a new $TMPDIR per
    job), the first root gone. Same ids in the same order: the same samples, so the exact resume of
    tests/training/test_resume.py holds."""
    from tests.training.helpers import run_checkpoint, run_in_process

    first, copy = tmp_path / "job-1" / "data", tmp_path / "job-2" / "data"
    _images(first)
    assert run_in_process(_folder_config(tmp_path, first, train={"max_steps": 1, "checkpoint_every": 1})) == 0
    shutil.copytree(first, copy)
    shutil.rmtree(first)
    capsys.readouterr()
    resumed = _folder_config(tmp_path, copy, train={"max_steps": 2, "checkpoint_every": 1})
    assert run_in_process(resumed, resume=True) == 0
    assert run_checkpoint(resumed, 2)["global_step"] == 2
    assert f"sgdm: data.root moved ({first} -> {copy}): accepted" in capsys.readouterr().err
