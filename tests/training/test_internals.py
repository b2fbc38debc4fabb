"""Training internals (checkpoint pruning, loss weighting, fp16 skips, cache)."""
from __future__ import annotations

import os

import torch

from sgdm.training.checkpoint import atomic_torch_save, checkpoint_name, find_last_valid, list_checkpoints, \
    prune_checkpoints


def test_pruning_after_a_resume_past_a_torn_newer_checkpoint_keeps_the_new_ones(tmp_path):
    """A resume starts from the newest *valid* checkpoint: a torn step-8 was skipped, training went on from
    step 2 and writes 4, 6. Pruning must not count the torn step-8 as the newest and delete 4 and 6."""
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / checkpoint_name(2))
    (tmp_path / checkpoint_name(8)).write_bytes((tmp_path / checkpoint_name(2)).read_bytes()[:-40])  # torn
    for i, step in enumerate((2, 8)):
        os.utime(tmp_path / checkpoint_name(step), ns=(10**18 + i, 10**18 + i))
    assert find_last_valid(tmp_path) == tmp_path / checkpoint_name(2)
    for i, step in enumerate((4, 6)):  # written by the resumed run, after the torn file
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / checkpoint_name(step))
        os.utime(tmp_path / checkpoint_name(step), ns=(2 * 10**18 + i, 2 * 10**18 + i))
        prune_checkpoints(tmp_path, keep=1)
        assert find_last_valid(tmp_path) == tmp_path / checkpoint_name(step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 8]


def _bare_module(tmp_path, **train):
    """The tiny unguided module, stepped by hand: backward only (no trainer, optimiser or logging)."""
    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.training.run import build_module
    from tests.training.helpers import tiny_config

    cfg = from_dict(ExperimentConfig, tiny_config(tmp_path, model={"guidance": {"kind": "none"}},
                                                  train={"batch_size": 4, **train}))
    module = build_module(cfg)
    module.first_stage.scale_factor.fill_(1.0)
    module.manual_backward = lambda loss: loss.backward()
    module._log_loss = lambda *args: None
    module._finish_step = lambda step: None
    return module


def _cached_batch(slots: list[int], position: int) -> dict:
    g = torch.Generator().manual_seed(5)
    mean, logvar = torch.randn(4, 2, 16, 16, generator=g), torch.randn(4, 2, 16, 16, generator=g) - 3
    return {"mean": mean[slots], "logvar": logvar[slots], "id": [str(s) for s in slots],
            "flipped": torch.zeros(len(slots), dtype=torch.bool), "position": torch.full((len(slots),), position),
            "slot": torch.tensor(slots)}


def _grads(module, batch, rank: int, world: int) -> list[torch.Tensor]:
    module.unet.zero_grad(set_to_none=True)
    module._rank, module._world = (lambda: rank), (lambda: world)
    module.training_step(batch, 0)
    return [p.grad.clone() for p in module.unet.parameters()]


def test_a_dropped_unreadable_sample_weighs_the_same_on_one_device_and_under_ddp(tmp_path):
    """data.on_bad_image: skip drops sample 3 of global micro-batch [0, 1, 2, 3]. Each readable sample must
    weigh 1 / batch_size on one device and on two (DDP averages the ranks' gradients): before, each rank
    averaged over its own readable samples, so rank 1's lone sample weighed 1/2 under DDP and 1/3 alone."""
    torch.manual_seed(0)
    module = _bare_module(tmp_path)
    one = _grads(module, _cached_batch([0, 1, 2], 7), rank=0, world=1)
    rank0 = _grads(module, _cached_batch([0, 1], 7), rank=0, world=2)
    rank1 = _grads(module, _cached_batch([2], 7), rank=1, world=2)
    for a, b, c in zip(one, rank0, rank1):
        torch.testing.assert_close(a, (b + c) / 2, rtol=1e-4, atol=1e-7)


def test_samples_after_a_dropped_one_keep_their_own_noise_on_one_device_and_under_ddp(tmp_path):
    """Sample 1 of global micro-batch [0, 1, 2, 3] is unreadable. Samples 2 and 3 must get the noise, timestep
    and posterior draws of their own slots on one device as on two: before, each rank handed its survivors
    the first rows of its slice, so on one device sample 2 took slot 1's draws and on two it took slot 2's."""
    torch.manual_seed(0)
    module = _bare_module(tmp_path)
    one = _grads(module, _cached_batch([0, 2, 3], 7), rank=0, world=1)
    rank0 = _grads(module, _cached_batch([0], 7), rank=0, world=2)
    rank1 = _grads(module, _cached_batch([2, 3], 7), rank=1, world=2)
    for a, b, c in zip(one, rank0, rank1):
        torch.testing.assert_close(a, (b + c) / 2, rtol=1e-4, atol=1e-7)


def test_fp16_steps_the_grad_scaler_skips_leave_the_ema_alone(tmp_path):
    """Under 16-mixed an overflowing step is skipped by the GradScaler (weights and optimiser unchanged, scale
    lowered). The EMA must not take an update for it either (docs: a skipped step leaves the EMA untouched,
    and the warm-up counts updates); before, sgdm treated every fp16 step as finite and updated the EMA."""
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.precision import MixedPrecision

    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.training.run import build_module
    from tests.training.helpers import tiny_config

    cfg = from_dict(ExperimentConfig, tiny_config(tmp_path, model={"guidance": {"kind": "none"}},
                                                  train={"max_steps": 3}))
    module = build_module(cfg)
    module.first_stage.scale_factor.fill_(1.0)
    unet0 = {k: v.clone() for k, v in module.unet.state_dict().items()}
    # a loss scale near float32's maximum: every backward overflows, so the scaler skips all 3 steps
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126)

    class ZeroEma(pl.Callback):
        def on_train_start(self, trainer, module):
            for p in module.ema.parameters():
                p.data.zero_()  # an EMA apart from the weights, so that an update would show

    trainer = pl.Trainer(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
                         max_epochs=-1, max_steps=-1, logger=False, callbacks=[ZeroEma()],
                         use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module)
    assert module.step == 3 and scaler.get_scale() == 2.0**123  # three overflows, three back-offs
    assert all(torch.equal(v, unet0[k]) for k, v in module.unet.state_dict().items())
    assert all(bool((p == 0).all()) for p in module.ema.parameters())
    assert (module.ema_updates, module.nan_skips) == (0, 0)  # the scaler's routine, not a fault


def test_a_complete_latent_cache_of_other_images_is_rebuilt(tmp_path, monkeypatch):
    """The fingerprint covers the data *settings* and the first-stage weights; a folder whose files changed
    under the same settings (images added or removed) must not be read through the old cache."""
    import sgdm.training.data as data
    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.training.latent_cache import LatentCacheDataset, ensure_latent_cache
    from sgdm.training.run import build_first_stage
    from tests.training.helpers import tiny_config

    cfg = from_dict(ExperimentConfig, tiny_config(tmp_path, train={"cache_latents": True, "cache_shard_size": 8}))
    first_stage = build_first_stage(cfg)
    full = LatentCacheDataset(ensure_latent_cache(cfg, first_stage))
    assert len(full) == 24
    second = full[1]  # read now: the rebuild below replaces the shard files
    build = data.build_image_dataset

    class Fewer(torch.utils.data.Dataset):  # the folder after some files were removed
        def __init__(self, base, ids):
            self.base, self.ids = base, ids

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, index):
            return {**self.base[index + 1], "id": self.ids[index]}

    monkeypatch.setattr(data, "build_image_dataset", lambda *a: (lambda b: Fewer(b, b.ids[1:]))(build(*a)))
    fewer = LatentCacheDataset(ensure_latent_cache(cfg, first_stage))
    assert len(fewer) == 23 and fewer[0]["id"] == second["id"]
    torch.testing.assert_close(fewer[0]["mean"], second["mean"])


def test_ema_warmup_is_ldm_litema_step_for_step():
    """LDM's LitEma counts the update before using it: its first update decays by (1 + 1) / (10 + 1)."""
    from sgdm.training.ema import ema_decay

    num_updates, litema = 0, []  # LitEma.forward: num_updates += 1, then min(decay, (1 + n) / (10 + n))
    for _ in range(5):
        num_updates += 1
        litema.append(min(0.9999, (1 + num_updates) / (10 + num_updates)))
    assert [ema_decay(n, 0.9999) for n in range(5)] == litema


def test_latents_encoded_under_bf16_autocast_are_sampled_and_scaled_in_float32(tmp_path):
    """Training from images under bf16-mixed encodes in bf16 (autocast convolutions). The posterior sample,
    the scale factor and so the noise target must still be float32, as from the latent cache: before, z_0,
    the noise and x_t were bf16 and scale_factor was rounded to bf16 (0.18215 -> 0.1826)."""
    from sgdm.training.rng import generator_for

    module = _bare_module(tmp_path)
    module.first_stage.scale_factor.fill_(0.18215)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = module.latents({"image": images, "slot": torch.arange(4)}, generator_for(0, "t", 0), 4)
        posterior = module.first_stage.encode(images)
    n = torch.randn(z.shape, generator=generator_for(0, "t", 0))
    expected = (posterior.mean.float() + torch.exp(0.5 * posterior.logvar.float()) * n) * torch.tensor(0.18215)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, expected, rtol=0, atol=0)


def test_a_shared_cache_dir_holding_other_latents_is_refused_not_rebuilt(tmp_path):
    """An explicit train.cache_dir may be shared by runs (the guided and unguided runs of one dataset read
    the same latents). A run whose data settings or first stage differ must not delete and rewrite the
    shards another run is reading: it is refused, naming the key; the run's own default directory
    (RUN/latents) is still rebuilt."""
    import pytest

    from sgdm.config.core import ConfigError, from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.training.latent_cache import ensure_latent_cache
    from sgdm.training.run import build_first_stage
    from tests.training.helpers import tiny_config

    shared = tmp_path / "shared-latents"
    first = from_dict(ExperimentConfig, tiny_config(tmp_path, train={"cache_latents": True, "cache_dir": str(shared),
                                                                     "cache_shard_size": 8}))
    first_stage = build_first_stage(first)
    ensure_latent_cache(first, first_stage)
    stamps = {p.name: p.stat().st_mtime_ns for p in shared.iterdir()}
    ensure_latent_cache(first, first_stage)  # the same settings: read as it is
    other = build_first_stage(first)
    for p in other.parameters():
        p.data.add_(0.01)  # another autoencoder
    with pytest.raises(ConfigError, match=r"train\.cache_dir.*other data settings or another first stage"):
        ensure_latent_cache(first, other)
    assert {p.name: p.stat().st_mtime_ns for p in shared.iterdir()} == stamps  # nothing deleted or rewritten

    own = from_dict(ExperimentConfig, tiny_config(tmp_path, run={"name": "own"},
                                                  train={"cache_latents": True, "cache_shard_size": 8}))
    ensure_latent_cache(own, first_stage)
    ensure_latent_cache(own, other)  # RUN/latents belongs to the run: rebuilt


def test_a_shared_latent_cache_outlives_a_moved_dataset_and_takes_its_old_fingerprint(tmp_path):
    """The latent cache is keyed by what the images are, not where: a dataset copied elsewhere (a resume
    that accepted a moved data.root, node-local scratch) reads the same cache, which a shared
    train.cache_dir refused ("other data settings") and the run's own directory re-encoded. A cache
    written when the fingerprint held the paths is taken as it is, and its manifest brought up to date."""
    import json
    import shutil

    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.training.latent_cache import ensure_latent_cache, fingerprint
    from sgdm.training.run import build_first_stage
    from tests.training.helpers import tiny_config

    shared = tmp_path / "shared-latents"
    train = {"cache_latents": True, "cache_dir": str(shared), "cache_shard_size": 8}
    first = from_dict(ExperimentConfig, tiny_config(tmp_path, train=train))
    first_stage = build_first_stage(first)
    ensure_latent_cache(first, first_stage)
    stamps = {p.name: p.stat().st_mtime_ns for p in shared.iterdir()}
    shutil.copytree(tmp_path / "shapes", tmp_path / "scratch-shapes")
    moved_dict = tiny_config(tmp_path, train=train)
    moved_dict["data"]["shapes"]["cache_dir"] = str(tmp_path / "scratch-shapes")
    moved = from_dict(ExperimentConfig, moved_dict)
    ensure_latent_cache(moved, first_stage)
    assert {p.name: p.stat().st_mtime_ns for p in shared.iterdir()} == stamps  # read as it is

    manifest_path = shared / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fingerprint"] = fingerprint(first.data, first_stage, locations=True)  # as written before
    manifest_path.write_text(json.dumps(manifest))
    shards = {p.name: p.stat().st_mtime_ns for p in shared.glob("shard-*")}
    ensure_latent_cache(first, first_stage)
    assert {p.name: p.stat().st_mtime_ns for p in shared.glob("shard-*")} == shards  # not re-encoded
    assert json.loads(manifest_path.read_text())["fingerprint"] == fingerprint(first.data, first_stage)
