"""In-process trainer behaviour: non-finite steps, latent cache, sample grids, export, EMA."""
from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from sgdm.config.core import from_dict
from sgdm.config.schema import ExperimentConfig
from sgdm.training.ema import ema_decay, update_ema
from sgdm.training.module import NonFiniteLossError
from sgdm.training.run import train
from tests.training.helpers import make_label_store, tiny_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    make_label_store(tiny_config(tmp))
    return tmp


class PoisonAndRecord(pl.Callback):
    """Makes the loss NaN at the given steps; records (unet, ema) weights after every step."""

    def __init__(self, bad_steps):
        self.bad_steps, self.states = set(bad_steps), {}

    def on_train_start(self, trainer, module):
        forward = module.unet.forward

        def poisoned(x, t, cond=None, cond_map=None):
            out = forward(x, t, cond, cond_map)
            return out * float("nan") if module.step in self.bad_steps else out

        module.unet.forward = poisoned

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        snapshot = lambda m: {k: v.clone() for k, v in m.state_dict().items()}  # noqa: E731
        self.states[module.step] = (snapshot(module.unet), snapshot(module.ema), module.nan_skips)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nan_skip_leaves_weights_and_ema_untouched_and_counts(workdir):
    cfg = from_dict(ExperimentConfig, tiny_config(workdir, run={"name": "nan-skip"}, train={"max_steps": 5}))
    rec = PoisonAndRecord({2})
    assert train(cfg, callbacks=[rec]) == 0
    unet2, ema2, skips2 = rec.states[3]  # state after step index 2 (the poisoned one)
    unet1, ema1, skips1 = rec.states[2]
    assert (skips1, skips2) == (0, 1)
    assert _same(unet1, unet2) and _same(ema1, ema2)
    assert not _same(rec.states[4][0], unet2)  # training went on
    assert max(rec.states) == 5 and rec.states[5][2] == 1


def test_nan_raise_names_the_step(workdir):
    cfg = from_dict(ExperimentConfig, tiny_config(workdir, run={"name": "nan-raise"},
                                                  train={"max_steps": 4, "on_nan": "raise"}))
    with pytest.raises(NonFiniteLossError, match="at step 1 "):
        train(cfg, callbacks=[PoisonAndRecord({1})])


def test_nan_skip_aborts_after_consecutive_skips(workdir):
    cfg = from_dict(ExperimentConfig, tiny_config(workdir, run={"name": "nan-abort"},
                                                  train={"max_steps": 6, "max_consecutive_nan": 2}))
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        train(cfg, callbacks=[PoisonAndRecord({1, 2, 3})])


def test_latent_cache_bf16_clipping_sample_grid_and_pipeline_export(workdir):
    from PIL import Image

    from sgdm.pipeline import SelfGuidedPipeline

    cfg = from_dict(ExperimentConfig, tiny_config(
        workdir, run={"name": "cached"},
        train={"max_steps": 2, "cache_latents": True, "cache_shard_size": 10, "sample_every": 2,
               "precision": "bf16-mixed", "grad_clip": 0.5, "accumulate": 2,
               "sample_scales": [0.0, 2.0], "export_pipeline": True, "logger": "csv", "log_every": 1}))
    assert train(cfg) == 0
    run = cfg.run.path
    assert sorted(p.name for p in (run / "latents").glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    grid = Image.open(run / "samples" / "step-00000002.png")
    # 3 cluster rows + 2 scale rows of 2 samples, 32 px each
    assert grid.size == (2 * 32, 5 * 32)
    assert (run / "logs" / "metrics.csv").read_text().count("train/loss_q") >= 1
    pipe = SelfGuidedPipeline.from_pretrained(run)
    ckpt = torch.load(run / "checkpoints" / "step-00000002.ckpt", weights_only=False)
    ema = {k[len("ema."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in ema.items())
    images = pipe(2, cluster=[0, 1], num_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                  progress=False)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_resume_rebuilds_a_missing_latent_cache_and_keeps_a_complete_one(workdir):
    import shutil

    cfg = from_dict(ExperimentConfig, tiny_config(
        workdir, run={"name": "cached-resume"}, train={"max_steps": 2, "cache_latents": True, "cache_shard_size": 10}))
    assert train(cfg) == 0
    latents = cfg.run.path / "latents"
    stamps = {p.name: p.stat().st_mtime_ns for p in latents.iterdir()}
    cfg.train.max_steps = 3
    assert train(cfg, resume=True) == 0
    assert {p.name: p.stat().st_mtime_ns for p in latents.iterdir()} == stamps  # complete: not rewritten
    shutil.rmtree(latents)  # deleted to save space, or a continuation started in a new run dir
    cfg.train.max_steps = 4
    assert train(cfg, resume=True) == 0
    assert json.loads((latents / "manifest.json").read_text())["complete"]
    assert (cfg.run.path / "checkpoints" / "step-00000004.ckpt").is_file()


def test_a_process_that_finds_the_latent_cache_being_built_waits_and_reuses_it(workdir, monkeypatch):
    """torchrun starts every rank at once: one builds the cache under its lock, the others wait for
    it and then read it, instead of encoding the dataset again into the same files."""
    import threading

    import sgdm.training.latent_cache as latent_cache
    from sgdm.training.data import build_image_dataset
    from sgdm.training.file_lock import exclusive_lock
    from sgdm.training.run import build_module

    cfg = from_dict(ExperimentConfig, tiny_config(workdir, run={"name": "cache-lock"},
                                                  train={"cache_latents": True, "cache_shard_size": 10}))
    first_stage = build_module(cfg).first_stage
    directory = latent_cache.cache_dir_for(cfg)
    directory.mkdir(parents=True)
    leftover = directory / ".shard-00000.safetensors.999.tmp"  # a write interrupted before
    leftover.write_bytes(b"partial")
    writes, errors = [], []
    write_shard = latent_cache._write_shard
    monkeypatch.setattr(latent_cache, "_write_shard", lambda *a: writes.append(a[1]) or write_shard(*a))

    def other_rank():
        try:
            latent_cache.ensure_latent_cache(cfg, first_stage)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    with exclusive_lock(directory / ".lock", "the test's cache"):
        waiter = threading.Thread(target=other_rank)
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not list(directory.glob("shard-*"))  # it waits and writes nothing
        latent_cache._build(cfg, first_stage, directory, 32)  # the first rank's build
        built = list(writes)
    waiter.join(timeout=120)
    assert not waiter.is_alive() and not errors
    assert built == [0, 1, 2] and writes == built  # the waiting rank encoded nothing
    assert not leftover.exists()  # removed by the first to take the lock after it
    assert len(latent_cache.LatentCacheDataset(directory)) == len(build_image_dataset(cfg.data, cfg.run.seed))


def test_ema_warmup_and_update_in_float64():
    assert ema_decay(0, 0.9999) == pytest.approx(2 / 11)  # LitEma's first update
    assert ema_decay(10**6, 0.9999) == 0.9999
    assert ema_decay(0, 0.9, warmup=False) == 0.9
    ema, model = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    expected = {k: 0.7 * v + 0.3 * model.state_dict()[k] for k, v in ema.state_dict().items()}
    update_ema(ema, model, 0.7)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="parameter names differ"):
        update_ema(ema, torch.nn.Sequential(model), 0.5)


@pytest.mark.parametrize("precision", ["16-mixed", "32-true"])
def test_grad_clip_bounds_the_true_gradient_norm(workdir, precision):
    """fp16's GradScaler multiplies the loss by 65536; the clip applies to the unscaled gradients."""
    from pytorch_lightning.plugins.precision import MixedPrecision, Precision

    from sgdm.training.run import build_module, prepare_run_dir
    from sgdm.training.scale import ensure_scale_factor

    clip = 1.0e-3  # far below the tiny model's gradient norm, so every step is clipped
    cfg = from_dict(ExperimentConfig, tiny_config(workdir, run={"name": f"clip-{precision}"},
                                                  train={"max_steps": 2, "grad_clip": clip}))
    prepare_run_dir(cfg, False)
    module = build_module(cfg)
    ensure_scale_factor(cfg, module)
    # Lightning turns 16-mixed into bf16 on a CPU; an explicit plugin keeps the fp16 GradScaler
    plugin = (MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=65536.0))
              if precision == "16-mixed" else Precision())
    norms = []

    class RecordStepNorm(pl.Callback):
        def on_train_start(self, trainer, module):
            def record(optimizer, args, kwargs):  # the gradients the step used (unscaled, clipped)
                grads = [p.grad.float() for p in module.unet.parameters() if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

            trainer.optimizers[0].register_step_post_hook(record)

    trainer = pl.Trainer(accelerator="cpu", devices=1, plugins=[plugin], max_epochs=-1, max_steps=-1, logger=False,
                         callbacks=[RecordStepNorm()], use_distributed_sampler=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(module)
    assert len(norms) == 2
    assert norms == pytest.approx([clip, clip], rel=1e-2)


def test_latent_cache_fingerprint_ignores_settings_that_do_not_change_pixels():
    import dataclasses

    from sgdm.data.config import DataConfig
    from sgdm.training.latent_cache import fingerprint

    net = torch.nn.Linear(2, 2)
    base = DataConfig(dataset="shapes", size=32)
    same = dataclasses.replace(base, num_workers=7, on_bad_image="raise", flip=False)
    assert fingerprint(same, net) == fingerprint(base, net)
    assert fingerprint(dataclasses.replace(base, size=64), net) != fingerprint(base, net)
    assert fingerprint(dataclasses.replace(base, max_images=3), net) != fingerprint(base, net)


class RecordIds(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append(sorted(batch["id"]))


def test_latent_cache_skips_an_unreadable_image_as_training_from_images_does(tmp_path):
    """data.on_bad_image: skip. The cache keeps the bad image's row (marked unreadable), so the data
    order is the same and the same micro-batches lose it; a shard of only that image is written too."""
    from sgdm.training.latent_cache import LatentCacheDataset
    from tests.data import fixtures

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(11):
        (root / f"img_{i:02d}.png").write_bytes(fixtures.encode(fixtures.sample_rgb(40, 32, seed=i), "PNG"))
    (root / "img_05b.png").write_bytes(b"\x89PNG\r\n")  # cut short: index 6 of 12
    seen = {}
    for cached in (False, True):
        cfg = from_dict(ExperimentConfig, tiny_config(
            tmp_path, run={"name": f"bad-{cached}"}, data={"dataset": "image_folder", "root": str(root)},
            model={"guidance": {"kind": "none", "num_classes": 0, "drop_prob": 0.0}},
            train={"max_steps": 3, "cache_latents": cached, "cache_shard_size": 1, "checkpoint_every": 3}))
        seen[cached] = RecordIds()
        assert train(cfg, callbacks=[seen[cached]]) == 0
    assert seen[True].seen == seen[False].seen and len(seen[True].seen) == 3  # one epoch
    assert sum(len(ids) for ids in seen[True].seen) == 3 * 4 - 1
    assert all("img_05b.png" not in ids for ids in seen[True].seen)
    cache = LatentCacheDataset(cfg.run.path / "latents")
    assert len(cache) == 12 and cache[6] is None and cache[7]["id"] == "img_06.png"


def test_the_latent_cache_and_scale_factor_are_encoded_on_the_training_gpu(monkeypatch):
    """On GPUs the first stage encodes the cache and the scale factor's sample on this process's GPU
    (LOCAL_RANK under Lightning's DDP), not on the CPU; a CPU run, or a machine without CUDA, stays on the CPU."""
    from sgdm.training.config import TrainConfig
    from sgdm.training.run import encode_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert encode_device(TrainConfig(accelerator="gpu")) == torch.device("cuda", 0)
    assert encode_device(TrainConfig(accelerator="auto")) == torch.device("cuda", 0)
    assert encode_device(TrainConfig(accelerator="cpu")) == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert encode_device(TrainConfig(accelerator="cuda")) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert encode_device(TrainConfig(accelerator="auto")) == torch.device("cpu")


@pytest.mark.cuda
def test_a_latent_cache_encoded_on_the_gpu_matches_the_cpus(workdir):
    from sgdm.training.latent_cache import LatentCacheDataset, ensure_latent_cache
    from sgdm.training.run import build_module

    cfg = from_dict(ExperimentConfig, tiny_config(workdir, run={"name": "cache-gpu"},
                                                  train={"cache_latents": True, "cache_shard_size": 10}))
    first_stage = build_module(cfg).first_stage
    caches = {}
    for device in ("cpu", "cuda"):
        cfg.run.name = f"cache-{device}"
        caches[device] = LatentCacheDataset(ensure_latent_cache(cfg, first_stage.to(device)))
    assert len(caches["cpu"]) == len(caches["cuda"])
    for i in range(len(caches["cpu"])):
        a, b = caches["cpu"][i], caches["cuda"][i]
        torch.testing.assert_close(a["mean"], b["mean"], rtol=1e-4, atol=1e-4)


def test_resuming_a_finished_run_says_there_is_nothing_to_train(workdir, capsys):
    cfg = tiny_config(workdir, run={"name": "finished"}, train={"max_steps": 2, "checkpoint_every": 2})
    assert train(from_dict(ExperimentConfig, cfg)) == 0
    capsys.readouterr()
    assert train(from_dict(ExperimentConfig, cfg), resume=True) == 0
    assert "is already at step 2 of train.max_steps=2: nothing to train; raise train.max_steps" in capsys.readouterr().err
    cfg["train"]["max_steps"] = 3
    assert train(from_dict(ExperimentConfig, cfg), resume=True) == 0
    assert "nothing to train" not in capsys.readouterr().err


def test_a_missing_autoencoder_that_prepare_will_not_make_stops_before_prepare(tmp_path, capsys):
    from sgdm.cli.main import main
    from tests.training.helpers import write_config

    cfg = tiny_config(tmp_path, model={"guidance": {"kind": "none", "drop_prob": 0.0},
                                       "autoencoder": {"checkpoint": str(tmp_path / "missing.ckpt")}},
                      prepare={"dataset": True, "autoencoder": False, "annotations": False})
    assert main(["train", str(write_config(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    assert "model.autoencoder.checkpoint" in err and "prepare.autoencoder: true" in err
    assert not (tmp_path / "shapes").exists()  # prepare.dataset did not run first


def test_sigterm_handling_is_sgdms_during_training_only(workdir, capsys):
    """sgdm takes SIGTERM while training (see StepCheckpoint) and gives the handler from before back,
    after a finished run and after a stopped one."""
    import os
    import signal

    class Kill(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            assert signal.getsignal(signal.SIGTERM) != before  # sgdm's, during training
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    cfg = tiny_config(workdir, run={"name": "sigterm"}, train={"max_steps": 4, "checkpoint_every": 4})
    assert train(from_dict(ExperimentConfig, cfg), callbacks=[Kill()]) == 143
    assert signal.getsignal(signal.SIGTERM) is before
    ckpt = workdir / "runs" / "sigterm" / "checkpoints" / "step-00000001.ckpt"
    assert f"sgdm: stopped by SIGTERM at step 1; wrote {ckpt}; continue" in capsys.readouterr().err
    assert train(from_dict(ExperimentConfig, cfg), resume=True) == 0
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("steps", [[6, 6], [6, 4]])
def test_processes_that_resumed_from_different_checkpoints_are_stopped(steps, tmp_path):
    """Each process finds the newest valid checkpoint on its own; a filesystem that shows two nodes
    different listings would have them resume from different steps (here: the gathered steps of 2)."""
    import types

    import torch

    from sgdm.training.callbacks import StepCheckpoint

    strategy = types.SimpleNamespace(all_gather=lambda t: torch.tensor(steps))
    trainer = types.SimpleNamespace(world_size=2, strategy=strategy)
    module = types.SimpleNamespace(step=steps[0], device=torch.device("cpu"))
    callback = StepCheckpoint(tmp_path / "checkpoints", every=2, keep=2)
    if steps[0] == steps[1]:
        callback._check_same_start(trainer, module)
        return
    with pytest.raises(RuntimeError, match=r"start from different steps \(\[6, 4\], by rank\): each took the newest "
                                           rf"valid checkpoint in {tmp_path / 'checkpoints'} on its own"):
        callback._check_same_start(trainer, module)
