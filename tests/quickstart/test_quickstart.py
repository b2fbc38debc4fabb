"""The quickstart's stages end to end on a drastically reduced budget (dotted overrides)."""
import dataclasses
import json

import pytest

from sgdm.cli.main import main
from sgdm.config.core import ConfigError
from sgdm.config.schema import load_experiment
from tests.quickstart.helpers import CONFIG, tiny_overrides


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    overrides = tiny_overrides(tmp)
    assert main(["train", str(CONFIG), *overrides]) == 0
    return tmp, overrides


def test_quickstart_config_is_complete_and_prepares_everything():
    cfg = load_experiment(CONFIG)
    p = cfg.prepare
    assert p.dataset and p.autoencoder and p.features and p.annotations and p.report
    assert cfg.data.dataset == "shapes" and cfg.model.guidance.kind == "label" and cfg.model.guidance.source == "self"
    assert cfg.annotation.weights is not None and cfg.model.autoencoder.checkpoint is not None
    assert "fid" not in cfg.eval.metrics  # offline: no Inception weights


def test_quickstart_writes_report_with_every_section(quickstart_run):
    tmp, _ = quickstart_run
    report = tmp / "runs" / "quickstart" / "report"
    page = (report / "index.html").read_text()
    for title in ("One row per cluster", "Guidance scale", "Box-guided samples", "Mask-guided samples", "Metrics"):
        assert title in page
    for png in ("clusters.png", "scales.png", "box-guided.png", "mask-guided.png"):
        assert (report / png).stat().st_size > 0 and png in page
    md = (report / "report.md").read_text()
    assert "fd_dino_shapes" in md and "box_iou" in md and "mask_miou" in md
    from PIL import Image

    assert Image.open(report / "clusters.png").size[1] > Image.open(report / "scales.png").size[1]  # 4 clusters vs 2 scales


def test_report_keeps_its_evaluations_to_itself(quickstart_run):
    """The report's small evaluations (prepare.report_eval_n samples) went to the run's eval/, so
    every repeated quickstart replaced the results of a full `sgdm-ldm eval` of the run."""
    import json

    tmp, _ = quickstart_run
    run = tmp / "runs" / "quickstart"
    report = run / "report"
    for folder, rows in ((report / "eval", 2), (report / "eval-box", 1), (report / "eval-mask", 1)):
        results = json.loads((folder / "results.json").read_text())
        assert results["n"] == 8 and len(results["results"]) == rows
    assert not (run / "eval" / "results.json").exists()
    for companion in ("box", "mask"):
        assert not (run / "companions" / companion / "eval" / "results.json").exists()


def test_repeated_quickstart_reuses_what_is_prepared(quickstart_run):
    from sgdm.quickstart import prepare

    tmp, overrides = quickstart_run
    assets = tmp / "assets"
    before = {p: p.stat().st_mtime_ns for p in (assets / "enc.safetensors", assets / "ann-label" / "manifest.json", assets / "ae.ckpt")}
    done = prepare(load_experiment(CONFIG, overrides), log=lambda m: None)
    assert done["autoencoder"].startswith("reused") and done["features"].startswith("reused")
    assert done["annotations"].startswith("reused")
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # The same command again: no error about the existing run directory, no further training.
    from safetensors.torch import load_file

    run = tmp / "runs" / "quickstart"
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    exported = load_file(run / "pipeline" / "model.safetensors")
    assert main(["train", str(CONFIG), *overrides, "prepare.report=false"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == steps
    again = load_file(run / "pipeline" / "model.safetensors")
    assert again.keys() == exported.keys() and all(again[k].equal(exported[k]) for k in exported)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_stale_encoder_and_stale_label_store_are_refused(quickstart_run, tmp_path):
    """An encoder pretrained with other settings is refused by name, and a label store whose
    encoder file changed under the same path is refused too, never reused silently."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from sgdm.annotation.store import StoreMismatchError
    from sgdm.quickstart import prepare

    tmp, overrides = quickstart_run
    enc, store = tmp_path / "enc.safetensors", tmp_path / "ann-label"
    shutil.copy(tmp / "assets" / "enc.safetensors", enc)
    shutil.copytree(tmp / "assets" / "ann-label", store)
    mine = [*overrides, f"annotation.weights={enc}", f"annotation.store={store}"]
    assert prepare(load_experiment(CONFIG, mine), log=lambda m: None)["annotations"].startswith("reused")
    with pytest.raises(ConfigError, match=r"annotation.weights: encoder .*enc.safetensors was pretrained with other "
                                          r"settings \(prepare.pretrain.steps differ\)"):
        prepare(load_experiment(CONFIG, [*mine, "prepare.pretrain.steps=3"]), log=lambda m: None)
    with safe_open(str(enc), "pt") as f:  # the same record, other weights: a re-pretrained encoder
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(meta["data"])["data.dataset"] == "shapes"  # the data it was pretrained on, compared too
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, str(enc), metadata=meta)
    with pytest.raises(StoreMismatchError, match=r"annotation.weights \(file content\) differ"):
        prepare(load_experiment(CONFIG, mine), log=lambda m: None)


def test_an_autoencoder_trained_with_other_settings_is_refused(quickstart_run, tmp_path):
    """prepare reused model.autoencoder.checkpoint whatever its run was trained with: a changed
    first stage (loss, data, budget) kept the old weights without a word."""
    import shutil

    from sgdm.quickstart import prepare

    tmp, overrides = quickstart_run
    only_ae = [*overrides, "prepare.features=false", "prepare.annotations=false"]
    assert prepare(load_experiment(CONFIG, only_ae), log=lambda m: None)["autoencoder"] == f"reused {tmp / 'assets' / 'ae.ckpt'}"
    for change, named in (("model.autoencoder.loss.kl_weight=1e-4", "model.autoencoder.loss.kl_weight"),
                          ("prepare.autoencoder_steps=3", "prepare.autoencoder_steps"),
                          ("data.size=16", "data.size, model.autoencoder.resolution")):
        with pytest.raises(ConfigError, match=rf"model.autoencoder.checkpoint: autoencoder .*ae.ckpt was trained with "
                                              rf"other settings \({named} differ from .*quickstart-autoencoder"):
            prepare(load_experiment(CONFIG, [*only_ae, change, "model.autoencoder.resolution=16",
                                             "model.unet.image_size=4"] if change.startswith("data.size") else
                                    [*only_ae, change]), log=lambda m: None)
    elsewhere = tmp_path / "ae.ckpt"  # weights without the run that made them: reused, and said so
    shutil.copy(tmp / "assets" / "ae.ckpt", elsewhere)
    done = prepare(load_experiment(CONFIG, [*only_ae, f"model.autoencoder.checkpoint={elsewhere}", "run.name=other"]),
                   log=lambda m: None)
    assert done["autoencoder"].startswith(f"reused {elsewhere} (no run") and "made elsewhere" in done["autoencoder"]


def test_an_autoencoder_is_compared_with_the_run_that_trained_it_whatever_the_run_name(quickstart_run):
    """The autoencoder's settings were looked up in RUN.name-autoencoder/, so under another run.name the
    quickstart's shapes autoencoder counted as "made elsewhere" and was reused for other data or losses."""
    from sgdm.quickstart import prepare
    from sgdm.training.autoencoder import trained_by

    tmp, overrides = quickstart_run
    assert trained_by(tmp / "assets" / "ae.ckpt") == tmp / "runs" / "quickstart-autoencoder"
    only_ae = [*overrides, "prepare.features=false", "prepare.annotations=false", "run.name=mine"]
    assert prepare(load_experiment(CONFIG, only_ae), log=lambda m: None)["autoencoder"] == f"reused {tmp / 'assets' / 'ae.ckpt'}"
    with pytest.raises(ConfigError, match=r"model.autoencoder.loss.kl_weight differ from .*quickstart-autoencoder"):
        prepare(load_experiment(CONFIG, [*only_ae, "model.autoencoder.loss.kl_weight=1e-4"]), log=lambda m: None)


def test_a_store_annotated_from_other_images_is_not_reused(quickstart_run, tmp_path, capsys):
    """prepare would report the store as reused and training stop at its first batch on an unknown id."""
    from sgdm.quickstart import prepare

    tmp, overrides = quickstart_run
    # (the autoencoder, trained on the 48 images, is refused for these too: not this test's subject)
    other = [*overrides, "data.shapes.num_images=52", f"data.shapes.cache_dir={tmp_path / 'shapes'}",
             f"run.dir={tmp_path / 'runs'}", "prepare.autoencoder=false"]
    with pytest.raises(ConfigError, match=r"annotation.store: .*ann-label was annotated from other images: 4 of the "
                                          r"dataset's 52 image ids .*data.shapes.num_images differs"):
        prepare(load_experiment(CONFIG, other), log=lambda m: None)
    assert main(["train", str(CONFIG), *other]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Delete the store" in err, err
    assert not (tmp_path / "runs").exists()


def test_prepare_without_target_paths_names_the_key(tmp_path):
    from sgdm.quickstart import prepare

    cfg = load_experiment(CONFIG, [*tiny_overrides(tmp_path), "prepare.autoencoder=false", "prepare.dataset=false"])
    # a config made in code (loading refuses it: tests.config.test_error_locations.py)
    cfg = dataclasses.replace(cfg, annotation=dataclasses.replace(cfg.annotation, weights=None))
    with pytest.raises(ConfigError, match="annotation.weights"):
        prepare(cfg, log=lambda m: None)
    cfg = load_experiment(CONFIG, [*tiny_overrides(tmp_path), "prepare.features=false", "prepare.autoencoder=false",
                                   "prepare.dataset=false"])
    with pytest.raises(ConfigError, match="annotation.weights: .*enc.safetensors does not exist; set prepare.features"):
        prepare(cfg, log=lambda m: None)


def test_prepare_trains_the_autoencoder_with_its_own_budget_and_lr(tmp_path, monkeypatch):
    import sgdm.training.autoencoder as ae_training
    from sgdm.quickstart import prepare

    seen = []

    def fake_train(cfg, resume=False):
        seen.append((cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr, cfg.run.name))
        cfg.model.autoencoder.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        cfg.model.autoencoder.checkpoint.write_bytes(b"weights")
        return 0

    monkeypatch.setattr(ae_training, "train_autoencoder", fake_train)
    only_ae = [*tiny_overrides(tmp_path), "prepare.dataset=false", "prepare.features=false",
               "prepare.annotations=false", "prepare.autoencoder_steps=5", "prepare.autoencoder_batch_size=3",
               "train.lr=1e-4"]
    assert prepare(load_experiment(CONFIG, only_ae), log=lambda m: None)["autoencoder"].startswith("trained")
    (tmp_path / "assets" / "ae.ckpt").unlink()
    prepare(load_experiment(CONFIG, [*only_ae, "prepare.autoencoder_lr=5e-4"]), log=lambda m: None)
    # its own rate (2e-4 by default), not train.lr: tests.quickstart.test_autoencoder_reuse.py
    assert seen == [(5, 3, 2e-4, "quickstart-autoencoder"), (5, 3, 5e-4, "quickstart-autoencoder")]
    with pytest.raises(ConfigError, match=r"prepare.autoencoder_lr: must be > 0"):
        load_experiment(CONFIG, [*only_ae, "prepare.autoencoder_lr=0"])


def _torchrun_env(monkeypatch, rank: int, world: int = 2) -> None:
    """The variables torchrun gives process ``rank`` of ``world`` on one node."""
    for name, value in {"TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world, "RANK": rank,
                        "LOCAL_RANK": rank, "GROUP_RANK": 0, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 1}.items():
        monkeypatch.setenv(name, str(value))


_TWO_CPUS = ["train.devices=2", "train.strategy=ddp", "train.accelerator=cpu"]


def test_launched_processes_only_reuse_what_prepare_only_made(tmp_path, monkeypatch, capsys):
    # Under torchrun every process runs the command at once: none may train the autoencoder or annotate
    # (they would race on the same files, and the autoencoder would try to join their DDP group).
    from sgdm.quickstart import prepare

    overrides = [*tiny_overrides(tmp_path), *_TWO_CPUS]
    with monkeypatch.context() as m:
        _torchrun_env(m, rank=1)
        assert main(["train", str(CONFIG), *overrides]) == 2
        err = capsys.readouterr().err
        assert "config error: prepare.autoencoder: the autoencoder " in err and "is not made yet" in err
        assert "run `sgdm-ldm train CONFIG --prepare-only`" in err
        assert main(["train", str(CONFIG), *overrides, "--prepare-only"]) == 2
        assert "--prepare-only: runs in one process, but torchrun started 2" in capsys.readouterr().err
        assert not (tmp_path / "assets" / "ae.ckpt").exists()
    # one process makes the assets, the autoencoder on one device, and trains nothing
    assert main(["train", str(CONFIG), *overrides, "--prepare-only"]) == 0
    assert (tmp_path / "assets" / "ae.ckpt").is_file() and (tmp_path / "assets" / "ann-label" / "manifest.json").is_file()
    assert not (tmp_path / "runs" / "quickstart").exists()
    assert "devices: 1" in (tmp_path / "runs" / "quickstart-autoencoder" / "config.yaml").read_text()
    with monkeypatch.context() as m:  # what each launched process then does before training: reuse
        _torchrun_env(m, rank=1)
        done = prepare(load_experiment(CONFIG, overrides), log=lambda msg: None, build=False)
    assert all(done[stage].startswith("reused") for stage in ("autoencoder", "features", "annotations"))
    assert main(["train", str(CONFIG), *tiny_overrides(tmp_path), "prepare.dataset=false", "prepare.autoencoder=false",
                 "prepare.features=false", "prepare.annotations=false", "--prepare-only"]) == 2
    assert "--prepare-only: the config has no prepare: stage to run" in capsys.readouterr().err


def test_a_run_of_several_processes_leaves_the_report_to_one(quickstart_run, monkeypatch, capsys):
    import shutil

    import sgdm.cli.train as train_cli

    tmp, overrides = quickstart_run
    report = tmp / "runs" / "quickstart" / "report"
    saved = tmp / "report-saved"
    shutil.copytree(report, saved)
    try:
        shutil.rmtree(report)
        monkeypatch.setattr(train_cli, "_several_processes", lambda cfg: 2)  # as after a DDP fit of 2 processes
        assert main(["train", str(CONFIG), *overrides]) == 0
        assert "sgdm: prepare.report is not written by a run of 2 processes; write it with the same command in " \
               "one process (train.devices=1" in capsys.readouterr().err
        assert not report.exists()
    finally:
        shutil.rmtree(report, ignore_errors=True)
        shutil.copytree(saved, report)


def test_sigterm_while_preparing_the_autoencoder_exits_143(tmp_path, monkeypatch, capsys):
    # train --help promises 143 after a SIGTERM: train_autoencoder returns it with its checkpoint written
    import sgdm.training.autoencoder as autoencoder

    monkeypatch.setattr(autoencoder, "train_autoencoder", lambda cfg, resume=None: 143)
    assert main(["train", str(CONFIG), *tiny_overrides(tmp_path)]) == 143
    assert not (tmp_path / "runs" / "quickstart").exists()  # nothing after the stopped stage ran


def test_sigterm_while_pretraining_the_encoder_exits_143(tmp_path, monkeypatch):
    # with prepare.pretrain.checkpoint_every, pretraining writes its checkpoint and raises PretrainStopped;
    # the quickstart's train ended in its traceback (exit 1) instead of 143
    import pathlib

    import sgdm.features_pretrain.run as run
    from sgdm.features_pretrain.train import PretrainStopped
    from sgdm.quickstart import stages

    def stopped(cfg, path, log=None):
        raise PretrainStopped(3, 10, pathlib.Path(f"{path}.resume.pt"))

    monkeypatch.setattr(run, "pretrain_from_config", stopped)
    monkeypatch.setattr(stages, "_STAGES", [(name, (lambda cfg, log, build=True: "reused (test)")
                                                   if name == "autoencoder" else stage)
                                            for name, stage in stages._STAGES])
    assert main(["train", str(CONFIG), *tiny_overrides(tmp_path)]) == 143
    assert not (tmp_path / "runs" / "quickstart").exists()
