"""The latent scale factor a new diffusion run computes (sgdm.training.scale)."""
from __future__ import annotations

import dataclasses
import re
import types

import pytest

from tests.training.helpers import tiny_config


def _factor(cfg, cache: bool, batch_size: int = 32, calls: list | None = None) -> float:
    from sgdm.training.latent_cache import ensure_latent_cache
    from sgdm.training.run import build_first_stage
    from sgdm.training.scale import ensure_scale_factor

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cache_latents=cache))
    first_stage = build_first_stage(cfg).eval()
    if cache:
        ensure_latent_cache(cfg, first_stage)
    if calls is not None:
        encode = first_stage.encode
        first_stage.encode = lambda x: calls.append(len(x)) or encode(x)
    ensure_scale_factor(cfg, types.SimpleNamespace(first_stage=first_stage), batch_size=batch_size)
    return first_stage.scale_factor.item()


@pytest.fixture
def cfg(tmp_path):
    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig

    return from_dict(ExperimentConfig, tiny_config(tmp_path, model={"guidance": {"kind": "none", "num_classes": 0,
                                                                                 "drop_prob": 0.0}},
                                                   train={"batch_size": 8}))


@pytest.mark.filterwarnings("ignore:model.autoencoder.checkpoint is not set")
def test_scale_factor_is_the_same_with_and_without_the_latent_cache_and_encodes_in_batches(cfg):
    """train.cache_latents only changes where the posteriors come from; it gave another factor (1 % on 8
    images) because the noise was drawn differently. The images are encoded a few at a time, not all
    train.batch_size at once (~180 MB each at 256 px)."""
    calls = []
    direct = _factor(cfg, cache=False, batch_size=3, calls=calls)
    assert calls == [3, 3, 2]
    assert direct == pytest.approx(_factor(cfg, cache=True), rel=1e-6)
    assert direct == pytest.approx(_factor(cfg, cache=False), rel=1e-6)


@pytest.mark.filterwarnings("ignore:model.autoencoder.checkpoint is not set")
def test_the_measured_factor_is_said(cfg, capsys, monkeypatch):
    """A run with scale_factor null says the value it measured, so a config can fix it (once, on rank 0)."""
    factor = _factor(cfg, cache=False)
    said = re.search(r"scale_factor = 1/std of the latents of the first 8 training images = ([0-9.e-]+) ",
                     capsys.readouterr().out)
    assert said and float(said.group(1)) == pytest.approx(factor, rel=1e-6)
    monkeypatch.setenv("RANK", "1")
    _factor(cfg, cache=False)
    assert capsys.readouterr().out == ""
