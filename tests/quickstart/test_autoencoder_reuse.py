"""The prepared autoencoder is defined by its own settings, not by the diffusion run's.

``prepare`` built the autoencoder's run from the diffusion run's ``run.seed`` and ``train.*``
(``train.lr`` unless ``prepare.autoencoder_lr`` was set, ``train.accumulate``), so a second diffusion
run on the same assets with another seed or rate was refused: "autoencoder ... trained with other
settings ... delete it"."""
import pytest
import yaml

from sgdm.config.core import ConfigError
from sgdm.config.schema import load_experiment
from tests.quickstart.helpers import CONFIG, tiny_overrides

_ONLY_AE = ["prepare.features=false", "prepare.annotations=false"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from sgdm.quickstart import prepare

    tmp = tmp_path_factory.mktemp("ae-reuse")
    overrides = [*tiny_overrides(tmp), *_ONLY_AE]
    assert prepare(load_experiment(CONFIG, overrides), log=lambda m: None)["autoencoder"].startswith("trained")
    return tmp, overrides


def _prepare(overrides):
    from sgdm.quickstart import prepare

    return prepare(load_experiment(CONFIG, overrides), log=lambda m: None)["autoencoder"]


def test_another_diffusion_seed_rate_or_accumulation_reuses_the_prepared_autoencoder(prepared):
    tmp, overrides = prepared
    reused = f"reused {tmp / 'assets' / 'ae.ckpt'}"
    for change in (["run.seed=1"], ["train.lr=1e-3"], ["train.accumulate=2"], ["train.warmup_steps=7"],
                   ["run.name=second", "run.seed=3", "train.lr=5e-4", "train.accumulate=4", "train.ema_decay=0.99"]):
        assert _prepare([*overrides, *change]) == reused, change


def test_a_key_that_defines_the_autoencoder_is_still_refused_by_name(prepared):
    tmp, overrides = prepared
    for change, named, value in (("prepare.autoencoder_seed=1", "prepare.autoencoder_seed", "0"),
                                 ("prepare.autoencoder_lr=1e-3", "prepare.autoencoder_lr", "0.0002"),
                                 ("prepare.autoencoder_accumulate=2", "prepare.autoencoder_accumulate", "1"),
                                 ("model.autoencoder.ch=16", "model.autoencoder.ch", "32")):
        with pytest.raises(ConfigError, match=rf"model.autoencoder.checkpoint: autoencoder .*ae.ckpt was trained with "
                                              rf"other settings \({named} differ.*; to reuse it set {named}={value}"):
            _prepare([*overrides, change])


def test_the_shipped_configs_train_their_autoencoder_as_before(tmp_path, monkeypatch):
    # seed, rate, accumulation and budget of the first stage that the quickstart and shapes_cpu trained
    # before the autoencoder had keys of its own (run.seed 0, their train.lr 2e-4, accumulate 1)
    import sgdm.training.autoencoder as ae_training

    seen = []

    def fake_train(cfg, resume=False):
        t = cfg.train
        seen.append((cfg.run.seed, t.lr, t.accumulate, t.batch_size, t.max_steps, t.devices, t.precision))
        cfg.model.autoencoder.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        cfg.model.autoencoder.checkpoint.write_bytes(b"weights")
        return 0

    monkeypatch.setattr(ae_training, "train_autoencoder", fake_train)
    from sgdm.quickstart import prepare

    for name in ("quickstart", "shapes_cpu"):
        cfg = load_experiment(CONFIG.with_name(f"{name}.yaml"),
                              [f"run.dir={tmp_path / name}", f"model.autoencoder.checkpoint={tmp_path / name / 'ae.ckpt'}",
                               "prepare.dataset=false", *_ONLY_AE])
        assert (cfg.run.seed, cfg.train.lr, cfg.train.accumulate) == (0, 2e-4, 1)  # what the old code read
        prepare(cfg, log=lambda m: None)
    assert seen == [(0, 2e-4, 1, 16, 600, 1, "32")] * 2


def _record_as_an_older_sgdm(run_dir, **changes):
    """Rewrite the autoencoder run's config.yaml as an older sgdm recorded it: the diffusion run's
    ``run.seed`` and ``train.*`` (``changes``: dotted key -> value)."""
    saved = run_dir / "config.yaml"
    data = yaml.safe_load(saved.read_text())
    for key, value in changes.items():
        section, leaf = key.split(".")
        data[section][leaf] = value
    saved.write_text(yaml.safe_dump(data, sort_keys=False))


def test_an_autoencoder_recorded_by_an_older_sgdm_is_reused_or_refused_with_the_keys_to_set(tmp_path):
    from sgdm.quickstart import prepare

    overrides = [*tiny_overrides(tmp_path), *_ONLY_AE]
    assert prepare(load_experiment(CONFIG, overrides), log=lambda m: None)["autoencoder"].startswith("trained")
    run_dir, reused = tmp_path / "runs" / "quickstart-autoencoder", f"reused {tmp_path / 'assets' / 'ae.ckpt'}"
    # the same effective settings, with the diffusion run's unused ones: reused
    _record_as_an_older_sgdm(run_dir, **{"train.warmup_steps": 50, "train.ema_decay": 0.999})
    assert _prepare(overrides) == reused
    # trained with a diffusion run's seed 5 and rate 1e-4: the keys that reproduce it, with their values
    _record_as_an_older_sgdm(run_dir, **{"run.seed": 5, "train.lr": 1.0e-4})
    with pytest.raises(ConfigError, match=r"other settings \(prepare.autoencoder_seed, prepare.autoencoder_lr differ "
                                          r"from .*config.yaml\); to reuse it set prepare.autoencoder_seed=5 "
                                          r"prepare.autoencoder_lr=0.0001 \(the values it was trained with\), or "
                                          r"delete it and .*quickstart-autoencoder to train it again"):
        _prepare(overrides)
    assert _prepare([*overrides, "prepare.autoencoder_seed=5", "prepare.autoencoder_lr=1e-4", "run.seed=7"]) == reused


def test_the_autoencoder_keys_are_validated_by_name():
    for override, message in (("prepare.autoencoder_seed=-1", r"prepare.autoencoder_seed: must be >= 0"),
                              ("prepare.autoencoder_accumulate=0", r"prepare.autoencoder_accumulate: must be >= 1"),
                              ("prepare.autoencoder_accumulate=3", r"prepare.autoencoder_batch_size: 16 must divide "
                                                                   r"by prepare.autoencoder_accumulate=3"),
                              ("prepare.autoencoder_lr=0", r"prepare.autoencoder_lr: must be > 0")):
        with pytest.raises(ConfigError, match=message):
            load_experiment(CONFIG, [override])


def test_a_run_recorded_before_the_autoencoder_had_its_own_rate_loads_with_its_meaning(tmp_path, monkeypatch):
    # every run's config.yaml recorded prepare.autoencoder_lr: null (train.lr); sample, eval and export load it
    import sgdm.training.autoencoder as ae_training
    from sgdm.config.core import dump_yaml
    from sgdm.config.schema import load_recorded
    from sgdm.quickstart import prepare
    from sgdm.quickstart.stages import Stopped

    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(load_experiment(CONFIG, ["prepare.autoencoder_lr=null"])))
    cfg = load_recorded(saved)
    assert cfg.prepare.autoencoder_lr is None
    seen = []
    monkeypatch.setattr(ae_training, "train_autoencoder", lambda cfg, resume=False: seen.append(cfg.train.lr) or 1)
    cfg = load_experiment(saved, [f"run.dir={tmp_path}", "train.lr=3e-4", "prepare.dataset=false", *_ONLY_AE])
    with pytest.raises(Stopped):  # (the fake run's exit code 1)
        prepare(cfg, log=lambda m: None)
    assert seen == [3e-4]
