"""Config errors exit with code 2 and name the key path, before data or devices are touched."""
from __future__ import annotations

import pathlib

import pytest

from sgdm.cli.main import main
from sgdm.config.core import ConfigError, dump_yaml, from_dict
from sgdm.config.schema import ExperimentConfig, check_annotation_store, recorded_config
from tests.training.helpers import make_label_store, tiny_config, write_config


def _run(capsys, tmp_path, cfg, *extra):
    code = main(["train", str(write_config(tmp_path, cfg)), *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, key", [
    ("train.bogus=1", "train.bogus"),
    ("model.unet.channels=abc", "model.unet.channels"),
    ("train.precision=fp8", "train.precision"),
    ("model.guidance.num_classes=5", "model.guidance.num_classes"),
    ("train.batch_size=6", "train.batch_size"),  # does not divide by accumulate=4
    ("train.sample_steps=500", "train.sample_steps"),
    ("model.unet.image_size=8", "model.unet.image_size"),  # the latents are 16x16
    ("train.lr=inf", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.weight_decay=.nan", "train.weight_decay"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.adam_eps=-1", "train.adam_eps"),
    ("train.adam_eps=0", "train.adam_eps"),
    ("train.betas=[0.9,1.0]", "train.betas[1]"),
    ("train.betas=[.nan,0.9]", "train.betas[0]"),
    ("train.grad_clip=inf", "train.grad_clip"),
    ("eval.feature_name=dino_{data}", "eval.feature_name"),  # only {dataset} is replaced
])
def test_bad_settings_exit_2_naming_the_key(capsys, tmp_path, override, key):
    cfg = tiny_config(tmp_path, train={"accumulate": 4} if key == "train.batch_size" else {})
    code, err = _run(capsys, tmp_path, cfg, override)
    assert code == 2
    assert f"config error: {key}:" in err
    assert not (tmp_path / "runs").exists()  # nothing touched
    assert not (tmp_path / "shapes").exists()


UNGUIDED = {"guidance": {"kind": "none", "num_classes": 0, "drop_prob": 0.0}}


def test_a_missing_first_stage_checkpoint_exits_2_before_the_run_dir_exists(capsys, tmp_path):
    code, err = _run(capsys, tmp_path, tiny_config(tmp_path, model=UNGUIDED), "model.autoencoder.checkpoint=nope.ckpt")
    # paths are recorded absolute, resolved against the working directory
    missing = pathlib.Path.cwd() / "nope.ckpt"
    assert code == 2 and f"config error: model.autoencoder.checkpoint: {missing} does not exist" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["train", "train-autoencoder"])
def test_a_batch_larger_than_the_dataset_exits_2_before_the_run_dir_exists(capsys, tmp_path, command):
    output = {"autoencoder": {"checkpoint": str(tmp_path / "ae.ckpt")}} if command == "train-autoencoder" else {}
    cfg = tiny_config(tmp_path, model={**UNGUIDED, **output}, train={"batch_size": 32})  # 24 images
    code = main([command, str(write_config(tmp_path, cfg))])
    err = capsys.readouterr().err
    assert code == 2 and "config error: train.batch_size: 32" in err and "24 images" in err
    assert not (tmp_path / "runs").exists()


def test_a_config_that_is_not_utf8_exits_2(capsys, tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00train: 1\n")
    assert main(["train", str(path)]) == 2
    assert f"config error: {path}: not UTF-8 text" in capsys.readouterr().err


def test_guidance_dropout_without_guidance(capsys, tmp_path):
    cfg = tiny_config(tmp_path, model={"guidance": {"kind": "none", "num_classes": 0, "drop_prob": 0.1}})
    code, err = _run(capsys, tmp_path, cfg)
    assert code == 2 and "model.guidance.drop_prob" in err and "no guidance" in err


def test_mask_channels_must_match_k(tmp_path):
    cfg = tiny_config(tmp_path, model={"guidance": {"kind": "mask", "num_classes": 4}},
                      annotation={"granularity": "mask", "num_classes": 5})
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, cfg)
    assert err.value.key == "model.guidance.num_classes" and "mask channel count 4" in str(err.value)


def test_guidance_kind_must_match_annotation_granularity(tmp_path):
    cfg = tiny_config(tmp_path, model={"guidance": {"kind": "box"}})
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, cfg)
    assert err.value.key == "annotation.granularity"


def test_missing_store_and_cluster_count_mismatch(capsys, tmp_path):
    cfg = tiny_config(tmp_path)
    code, err = _run(capsys, tmp_path, cfg)
    assert code == 2 and "annotation.store" in err and "sgdm-ldm annotate" in err
    make_label_store(cfg, num_classes=2)  # the config says K=3
    with pytest.raises(ConfigError) as exc:
        check_annotation_store(from_dict(ExperimentConfig, cfg))
    assert exc.value.key == "model.guidance.num_classes" and "K=2" in str(exc.value)


def test_print_config_resolves_overrides(capsys, tmp_path):
    cfg = tiny_config(tmp_path)
    code = main(["train", str(write_config(tmp_path, cfg)), "train.lr=5e-5", "--print-config"])
    out = capsys.readouterr().out
    assert code == 0 and "lr: 5.0e-05" in out and "drop_prob: 0.3" in out
    assert from_dict(ExperimentConfig, __import__("yaml").safe_load(out)).train.lr == 5e-5


def test_printed_config_of_an_unguided_run_loads_back(capsys, tmp_path):
    from sgdm.config.schema import load_experiment

    path = tmp_path / "unguided.yaml"
    path.write_text("run:\n  name: u\n")
    assert main(["train", str(path), "--print-config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert main(["train", str(printed), "--print-config"]) == 0
    assert capsys.readouterr().out == printed.read_text()
    assert load_experiment(printed).model.guidance.drop_prob == 0


def test_run_name_and_dir_overrides_are_taken_as_written():
    from sgdm.config.schema import load_experiment

    cfg = load_experiment(None, ["data.size=256", "run.name=exp #3", "run.dir=2024", "annotation.store=1.0"])
    assert cfg.run.path == pathlib.Path.cwd() / "2024/exp #3" and cfg.annotation.store == pathlib.Path.cwd() / "1.0"
    assert load_experiment(None, ["data.size=256", "run.name=0755"]).run.name == "0755"


def test_overrides_and_options_mix_in_any_order(capsys, tmp_path):
    path = str(write_config(tmp_path, tiny_config(tmp_path)))
    orders = [[path, "train.lr=5e-5", "--print-config", "train.max_steps=7"],
              [path, "--print-config", "train.lr=5e-5", "train.max_steps=7"]]
    outs = []
    for order in orders:
        assert main(["train", *order]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "lr: 5.0e-05" in outs[0] and "max_steps: 7" in outs[0]
    with pytest.raises(SystemExit):
        main(["train", "--print-config"])
    assert capsys.readouterr().err.rstrip().endswith("the following arguments are required: config")


def test_both_trainers_print_the_same_resolved_config(capsys, tmp_path):
    path = str(write_config(tmp_path, tiny_config(tmp_path)))
    printed = []
    for command in ("train", "train-autoencoder"):
        assert main([command, path, "train.max_steps=7", "--print-config"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and "max_steps: 7" in printed[0]
    assert not (tmp_path / "runs").exists()  # printing prepares and writes nothing


def test_existing_run_needs_resume(capsys, tmp_path):
    cfg = tiny_config(tmp_path)
    make_label_store(cfg)
    ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "step-00000002.ckpt").write_bytes(b"x")
    code, err = _run(capsys, tmp_path, cfg)
    assert code == 2 and "run.name" in err and "--resume" in err
    code, err = _run(capsys, tmp_path, cfg, "--resume")
    assert code == 2 and "no readable checkpoint" in err


@pytest.mark.parametrize("command", ["train", "train-autoencoder"])
def test_resume_and_auto_resume_exclude_each_other(capsys, tmp_path, command):
    with pytest.raises(SystemExit) as info:
        main([command, str(write_config(tmp_path, tiny_config(tmp_path))), "--resume", "--auto-resume"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "train-autoencoder"])
def test_resume_of_a_run_without_checkpoints_is_refused(capsys, tmp_path, command):
    """A mistyped run.name with --resume must not silently start a new run from step 0."""
    cfg = tiny_config(tmp_path, run={"name": "typo"}, model={"autoencoder": {"checkpoint": str(tmp_path / "ae.ckpt")}})
    make_label_store(cfg)
    code = main([command, str(write_config(tmp_path, cfg)), "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "run.name" in err and str(tmp_path / "runs" / "typo") in err and "drop --resume" in err
    assert not (tmp_path / "runs" / "typo").exists()  # nothing written


def test_store_annotated_from_other_images_is_refused_before_any_work(capsys, tmp_path):
    """Training would otherwise stop at its first batch with a KeyError for an id the store lacks."""
    from sgdm.annotation.store import AnnotationStore, write_store

    cfg = tiny_config(tmp_path)
    make_label_store(cfg)
    more = tiny_config(tmp_path, data={"shapes": {"num_images": 28}})
    code, err = _run(capsys, tmp_path, more)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "annotation.store" in err and "4 of the dataset's 28 image ids are not in it" in err
    assert "data.shapes.num_images differs (store: 24, now: 28)" in err and "Delete the store" in err
    assert not (tmp_path / "runs").exists()
    # a store made from more images than the run uses holds all of its ids: accepted
    check_annotation_store(from_dict(ExperimentConfig, tiny_config(tmp_path, data={"max_images": 10})))
    # a store that does not record its data settings (written by another tool) is still compared by ids
    store = AnnotationStore.open(cfg["annotation"]["store"])
    write_store(store.path, store.ids[:20], {"cluster": store.tensor("cluster")[:20]}, granularity="label",
                num_classes=3)
    with pytest.raises(ConfigError, match="4 of the dataset's 24 .* does not record the data settings"):
        check_annotation_store(from_dict(ExperimentConfig, cfg))


def test_resume_refuses_settings_that_change_the_run(tmp_path):
    from sgdm.training.checkpoint import atomic_torch_save, checkpoint_name
    from sgdm.training.run import prepare_run_dir

    cfg = from_dict(ExperimentConfig, tiny_config(tmp_path))
    assert prepare_run_dir(cfg, resume=False) is None  # writes config.yaml
    atomic_torch_save({"x": 1}, cfg.run.path / "checkpoints" / checkpoint_name(2))
    longer = from_dict(ExperimentConfig, tiny_config(tmp_path, train={"max_steps": 99}))
    assert prepare_run_dir(longer, resume=True).name == checkpoint_name(2)
    other = from_dict(ExperimentConfig, tiny_config(tmp_path, train={"batch_size": 8}))
    with pytest.raises(ConfigError) as err:
        prepare_run_dir(other, resume=True)
    assert err.value.key == "train.batch_size" and "4 -> 8" in str(err.value)


def _saved_run(tmp_path) -> None:
    from sgdm.training.checkpoint import atomic_torch_save, checkpoint_name
    from sgdm.training.run import prepare_run_dir

    cfg = from_dict(ExperimentConfig, tiny_config(tmp_path))
    prepare_run_dir(cfg, resume=False)
    atomic_torch_save({"x": 1}, cfg.run.path / "checkpoints" / checkpoint_name(2))


@pytest.mark.parametrize("changes, key, old_new", [
    ({"train": {"grad_clip": 1.0e-6}}, "train.grad_clip", "None -> 1e-06"),
    ({"train": {"precision": "bf16-mixed"}}, "train.precision", "'32' -> 'bf16-mixed'"),
    ({"annotation": {"store": "elsewhere"}}, "annotation.store", "elsewhere'"),  # recorded absolute
    ({"data": {"flip": False}}, "data.flip", "True -> False"),
    ({"model": {"unet": {"dropout": 0.1}}}, "model.unet.dropout", "0.0 -> 0.1"),
    ({"train": {"cache_latents": True}}, "train.cache_latents", "False -> True"),
])
def test_resume_refuses_a_result_changing_setting_naming_the_leaf(tmp_path, changes, key, old_new):
    from sgdm.training.run import prepare_run_dir

    _saved_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        prepare_run_dir(from_dict(ExperimentConfig, tiny_config(tmp_path, **changes)), resume=True)
    assert err.value.key == key and old_new in str(err.value)
    assert "{" not in str(err.value)  # no section dump


@pytest.mark.parametrize("changes", [
    {"data": {"num_workers": 2}},
    {"data": {"on_bad_image": "raise"}},
    {"model": {"unet": {"gradient_checkpointing": True}}},
    {"model": {"autoencoder": {"loss": {"disc_start": 5}}}},  # the first stage's loss: unused here
    {"train": {"max_steps": 99, "checkpoint_every": 3, "log_every": 7, "sample_every": 4, "on_nan": "raise"}},
    {"sampler": {"steps": 3}, "eval": {"n": 8}},
])
def test_resume_accepts_performance_and_bookkeeping_settings(tmp_path, changes):
    from sgdm.training.checkpoint import checkpoint_name
    from sgdm.training.run import prepare_run_dir

    _saved_run(tmp_path)
    assert prepare_run_dir(from_dict(ExperimentConfig, tiny_config(tmp_path, **changes)), resume=True).name == \
        checkpoint_name(2)


def test_resume_rules_depend_on_the_trainer():
    from sgdm.training.resume import resume_differences

    old = {"model": {"unet": {"channels": 8}, "autoencoder": {"loss": {"disc_start": 1}}}}
    new = {"model": {"unet": {"channels": 16}, "autoencoder": {"loss": {"disc_start": 5}}}}
    assert resume_differences(old, new, "diffusion") == [("model.unet.channels", 8, 16)]
    assert resume_differences(old, new, "autoencoder") == [("model.autoencoder.loss.disc_start", 1, 5)]
    assert resume_differences({"train": {}}, {"train": {"new_key": 1}}) == []  # saved by an older version


def test_defaults_validate_and_only_written_dropout_without_guidance_is_refused(tmp_path):
    from sgdm.config.schema import load_experiment

    cfg = load_experiment(None, ["data.size=256"])
    assert cfg.model.guidance.kind == "none"  # default drop_prob 0.1 is harmless there
    with pytest.raises(ConfigError, match="model.guidance.drop_prob"):
        load_experiment(None, ["model.guidance.drop_prob=0.2"])
    assert load_experiment(None, ["model.guidance.drop_prob=0"]).model.guidance.drop_prob == 0


def test_saved_config_of_an_unguided_run_reads_back(tmp_path):
    from sgdm.config.schema import load_experiment
    from sgdm.training.run import prepare_run_dir

    cfg = load_experiment(None, [f"run.dir={tmp_path}", "data.size=256"])
    prepare_run_dir(cfg, resume=False)
    again = load_experiment(cfg.run.path / "config.yaml")
    assert again.model.guidance.drop_prob == 0 and again.model.unet == cfg.model.unet


def test_errors_with_a_complete_message_are_one_line_from_any_command(monkeypatch, capsys):
    """A mismatched annotation store or an unusable backbone says what to do: `sgdm-ldm` prints it as
    one line (exit 1), not a traceback; any other ValueError is a bug and keeps its traceback."""
    import sgdm.cli.train as train_cli
    from sgdm.annotation.features import BackboneError
    from sgdm.annotation.store import StoreMismatchError

    for error in (StoreMismatchError("annotation store s was made with other settings; delete it"),
                  BackboneError("unknown backbone 'x': not a timm model name")):
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(train_cli, "run", fail)
        assert main(["train", "any.yaml"]) == 1
        assert capsys.readouterr().err == f"sgdm-ldm train: error: {error}\n"

    def bug(args):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(train_cli, "run", bug)
    with pytest.raises(ValueError, match="internal inconsistency"):
        main(["train", "any.yaml"])


@pytest.mark.parametrize("error, one_line", [
    (OSError(28, "could not write /runs/x/step-00000010.ckpt: No space left on device; the file there, if any, "
                 "is unchanged"), True),
    (OSError(122, "Disk quota exceeded"), True),
    (PermissionError(13, "Permission denied", "/runs/x/config.yaml"), True),
    (PermissionError(13, "Permission denied"), False),  # which file? keep the traceback
    (OSError(5, "Input/output error"), False),
])
def test_a_full_disk_or_an_unwritable_file_is_one_line(monkeypatch, capsys, error, one_line):
    """A full disk (ENOSPC, EDQUOT) printed a traceback; its fix is outside the program."""
    import sgdm.cli.train as train_cli

    def fail(args):
        raise error

    monkeypatch.setattr(train_cli, "run", fail)
    if one_line:
        assert main(["train", "any.yaml"]) == 1
        assert capsys.readouterr().err == f"sgdm-ldm train: error: {error}\n"
    else:
        with pytest.raises(OSError):
            main(["train", "any.yaml"])


def test_version(capsys):
    import sgdm

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"sgdm-ldm {sgdm.__version__}\n"


@pytest.mark.parametrize("wrapped", [False, True], ids=["in-process", "from-a-worker"])
def test_a_bad_image_under_on_bad_image_raise_is_one_line(capsys, tmp_path, monkeypatch, wrapped):
    """Any subcommand: a BadImageError (data.on_bad_image: raise), also as a DataLoader worker's
    RuntimeError, ends in one line naming the file, exit 1."""
    import sgdm.cli.train as train_cli
    from sgdm.data.decode import BadImageError

    error = BadImageError("/data/img_7.png", "cannot decode (OSError: image file is truncated)")
    if wrapped:  # what torch re-raises for a worker's exception it cannot rebuild
        error = RuntimeError(f"Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback "
                             f"(most recent call last):\n  ...\nsgdm.data.decode.BadImageError: {error}")

    def fail(args):
        raise error

    monkeypatch.setattr(train_cli, "run", fail)
    code = main(["train", str(write_config(tmp_path, tiny_config(tmp_path)))])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("sgdm-ldm train: error: /data/img_7.png") and "data.on_bad_image is 'raise'" in err


def test_resume_of_a_run_saved_with_relative_paths(tmp_path, monkeypatch):
    """Runs saved before paths were recorded absolute hold them as typed; resumed from the same
    directory, they are the same paths, and nothing is refused."""
    import yaml

    from sgdm.config.schema import load_experiment
    from sgdm.training.resume import check_resume_compatible

    monkeypatch.chdir(tmp_path)
    cfg = load_experiment(None, ["data.size=256", "run.dir=runs", "annotation.store=store"])
    saved = tmp_path / "config.yaml"
    old = yaml.safe_load(dump_yaml(recorded_config(cfg)))
    old["run"]["dir"], old["annotation"]["store"] = "runs", "store"  # as an older sgdm wrote them
    saved.write_text(dump_yaml(old))
    check_resume_compatible(cfg, saved)
    old["annotation"]["store"] = "other"
    saved.write_text(dump_yaml(old))
    with pytest.raises(ConfigError, match="annotation.store"):
        check_resume_compatible(cfg, saved)
