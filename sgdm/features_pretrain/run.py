"""``pretrain-features`` from an experiment config: data + annotation backbone + budget."""
from __future__ import annotations

import pathlib

from sgdm.config.core import ConfigError

__all__ = ["pretrain_from_config"]


def pretrain_from_config(cfg, out: str | pathlib.Path | None = None, log=None) -> pathlib.Path:
    """Train ``cfg.annotation.backbone`` (+ ``backbone_kwargs``) with ``cfg.prepare.pretrain`` on ``cfg.data``.

    ``cfg`` is an :class:`~sgdm.config.schema.ExperimentConfig`. The encoder is
    written to ``out`` or ``annotation.weights``, where ``annotate`` reads it.
    """
    from sgdm.annotation.annotate import data_settings
    from sgdm.data import build_dataset
    from sgdm.features_pretrain.train import WEIGHT_SUFFIXES, pretrain_features

    target = pathlib.Path(out) if out is not None else cfg.annotation.weights
    if target is None:
        raise ConfigError("annotation.weights", "no output file: set annotation.weights (or pass --out) to where the encoder goes")
    if target.suffix not in WEIGHT_SUFFIXES:  # before the training, not when its result is saved
        raise ConfigError("annotation.weights" if target == cfg.annotation.weights else "out",
                          f"{target}: the encoder is saved as a {', '.join(WEIGHT_SUFFIXES)} file")
    dataset = build_dataset(cfg.data, train=True, seed=cfg.run.seed)
    checkpoint = target.with_name(target.name + ".resume.pt") if cfg.prepare.pretrain.checkpoint_every else None
    return pretrain_features(dataset, cfg.annotation.backbone, dict(cfg.annotation.backbone_kwargs), cfg.prepare.pretrain,
                             target, log=log, data_record=data_settings(cfg.data), num_workers=cfg.data.num_workers,
                             checkpoint=checkpoint)
