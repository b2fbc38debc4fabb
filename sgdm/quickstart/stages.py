"""``prepare(cfg)``: make whatever the run needs and does not have yet, on small budgets.

Each stage checks for its artefact first and reuses it, so a second run of the
quickstart goes straight to training. The stages, in order (each only when its
``prepare.<flag>`` is set):

- ``dataset``: build the dataset once (the ``shapes`` generator writes its cache);
- ``autoencoder``: ``model.autoencoder.checkpoint`` via ``train_autoencoder`` with
  ``prepare.autoencoder_steps`` steps of ``prepare.autoencoder_batch_size`` images
  at ``prepare.autoencoder_lr``, seeded by ``prepare.autoencoder_seed`` (not the diffusion
  run's ``run.seed`` or ``train.lr``, so that another diffusion run reuses it);
- ``features``: ``annotation.weights`` via DINO pretraining of
  ``annotation.backbone`` with ``prepare.pretrain``;
- ``annotations``: the ``annotation.store`` via ``annotate`` (with ``--evaluate``
  scores where the data has ground truth).

The stages run in one process (the autoencoder on one device). A run of several processes
(``train.devices`` or ``train.num_nodes`` above 1, torchrun, srun) calls ``prepare(cfg, build=False)``:
every process checks and reuses what ``sgdm-ldm train CONFIG --prepare-only`` made, and a stage whose
artefact is missing is a ``ConfigError`` saying so, before any process trains.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Callable

from sgdm.config.core import ConfigError

__all__ = ["prepare", "store_exists", "reusable_store", "run_settings_differ", "Stopped"]


class Stopped(Exception):
    """A training run inside ``prepare`` or the report ended early (SIGTERM: ``code`` 143, Ctrl+C: 130, with its
    checkpoint written); the same command continues it. ``sgdm-ldm train`` exits with ``code``."""

    def __init__(self, what: str, code: int):
        super().__init__(f"{what} stopped with exit code {code}; the same command continues it")
        self.code = code


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def store_exists(path: pathlib.Path) -> bool:
    """An annotation store is complete once its manifest is written (the last step of ``write_store``)."""
    return (pathlib.Path(path) / "manifest.json").is_file()


def reusable_store(annotation, data=None) -> bool:
    """True when ``annotation.store`` is complete and was made with these settings (and, given the
    ``data`` config, from its images); False when it is missing or unfinished; a complete store made
    with other settings or other images is refused by name, never reused silently (a changed
    ``annotation.lost`` would otherwise keep the old boxes, other images fail in training)."""
    from sgdm.annotation.store import AnnotationStore, StoreMismatchError

    if not store_exists(annotation.store):
        return False
    opened = AnnotationStore.open(annotation.store)
    if (opened.granularity, opened.source) != (annotation.granularity, annotation.source):
        # settings_differ compares at the store's own granularity (annotate may be told another)
        raise StoreMismatchError(
            f"annotation store {annotation.store} holds {opened.source} {opened.granularity} annotations, not the "
            f"{annotation.source} {annotation.granularity} ones this run needs (annotation.source, "
            f"annotation.granularity); point annotation.store elsewhere, or delete it to annotate again")
    differ = opened.settings_differ(annotation)
    if differ:
        raise StoreMismatchError(
            f"annotation store {annotation.store} was made with other settings (annotation.{', annotation.'.join(differ)} "
            f"differ); delete it to annotate again, or point annotation.store elsewhere")
    if data is not None:
        from sgdm.config.schema import check_store_dataset

        check_store_dataset(opened, data)
    return True


def _not_built(name: str, what) -> ConfigError:
    return ConfigError(f"prepare.{name}", f"{what} is not made yet, and a run of several processes only reuses what "
                                          "prepare made: run `sgdm-ldm train CONFIG --prepare-only` (the same config "
                                          "and overrides) once in one process first")


def _dataset(cfg, log, build: bool = True) -> str:
    from sgdm.data import build_dataset

    if not build:
        return "left to the training processes"

    n = len(build_dataset(cfg.data, train=False))
    return f"{cfg.data.dataset}: {n} images"


# the autoencoder run's settings that prepare sets from its own keys (its other train.* keys say how it
# runs, or are unused by its trainer: sgdm.training.resume.UNUSED_BY)
_AUTOENCODER_KEYS = {"run.seed": "prepare.autoencoder_seed", "train.max_steps": "prepare.autoencoder_steps",
                     "train.batch_size": "prepare.autoencoder_batch_size", "train.lr": "prepare.autoencoder_lr",
                     "train.accumulate": "prepare.autoencoder_accumulate"}


def _recorded_differences(cfg, trainer: str, run_dir: pathlib.Path | None) -> list[tuple[str, object]] | None:
    """(key, value in the run's ``config.yaml``) of each setting :func:`run_settings_differ` names."""
    import yaml

    from sgdm.config.core import absolute_paths, dump_yaml
    from sgdm.config.schema import ExperimentConfig, recorded_config
    from sgdm.training.resume import resume_differences

    saved = (cfg.run.path if run_dir is None else run_dir) / "config.yaml"
    if not saved.is_file():
        return None
    old = absolute_paths(ExperimentConfig, yaml.safe_load(saved.read_text()) or {})
    found = [(key, before) for key, before, _ in
             resume_differences(old, yaml.safe_load(dump_yaml(recorded_config(cfg))), trainer)]
    steps = (old.get("train") or {}).get("max_steps", cfg.train.max_steps)
    if steps != cfg.train.max_steps:
        found.append(("train.max_steps", steps))
    return found


def run_settings_differ(cfg, trainer: str = "diffusion", run_dir: pathlib.Path | None = None) -> list[str] | None:
    """The settings of ``cfg`` that differ from the ``config.yaml`` of ``run_dir`` (default: its own run
    directory): those its weights depend on (as ``--resume`` compares them for ``trainer``) and its step
    budget ``train.max_steps``; None when the run left no config (weights made elsewhere)."""
    found = _recorded_differences(cfg, trainer, run_dir)
    return None if found is None else [key for key, _ in found]


def _override(value) -> str:
    """``value`` as a dotted override writes it (a list without spaces, for a shell)."""
    if isinstance(value, list):
        return "[" + ",".join(_override(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _autoencoder_run(cfg):
    """The run that trains the prepared autoencoder: its own keys (``prepare.autoencoder_*``) for what
    defines it, the diffusion run's ``train.*`` only for how it runs; one process on one device (a
    small budget, and a run of several processes must not train it N times)."""
    p = cfg.prepare
    budget = dataclasses.replace(cfg.train, max_steps=p.autoencoder_steps, batch_size=p.autoencoder_batch_size,
                                 lr=cfg.train.lr if p.autoencoder_lr is None else p.autoencoder_lr,
                                 accumulate=p.autoencoder_accumulate,
                                 checkpoint_every=min(cfg.train.checkpoint_every, p.autoencoder_steps),
                                 devices=1, num_nodes=1, strategy="auto")
    run = dataclasses.replace(cfg.run, name=f"{cfg.run.name}-autoencoder", seed=p.autoencoder_seed)
    return dataclasses.replace(cfg, train=budget, run=run)


def _autoencoder(cfg, log, build: bool = True) -> str:
    path = cfg.model.autoencoder.checkpoint
    if path is None:
        raise ConfigError("model.autoencoder.checkpoint", "prepare.autoencoder needs a path to write the autoencoder to")
    ae_cfg = _autoencoder_run(cfg)
    if path.is_file():
        from sgdm.training.autoencoder import trained_by

        # the run that wrote the file (its record), whatever this run is called; else, for a file
        # without one (an older sgdm), the run this config would train it in
        run_dir = trained_by(path) or ae_cfg.run.path
        differ = _recorded_differences(ae_cfg, "autoencoder", run_dir)
        if differ is None:
            return f"reused {path} (no run {run_dir} records how it was trained: made elsewhere)"
        if differ:
            # (an older sgdm recorded the diffusion run's seed and rate: the same keys name them)
            keys = [_AUTOENCODER_KEYS.get(key, key) for key, _ in differ]
            values = " ".join(f"{key}={_override(value)}" for key, (_, value) in zip(keys, differ))
            raise ConfigError("model.autoencoder.checkpoint",
                              f"autoencoder {path} was trained with other settings "
                              f"({', '.join(keys)} differ from {run_dir / 'config.yaml'}); to reuse it set "
                              f"{values} (the values it was trained with), or delete it and {run_dir} to train "
                              f"it again, or point model.autoencoder.checkpoint elsewhere")
        return f"reused {path}"
    if not build:
        raise _not_built("autoencoder", f"the autoencoder {path} (model.autoencoder.checkpoint)")
    from sgdm.training.autoencoder import train_autoencoder
    from sgdm.training.checkpoint import list_checkpoints

    resume = bool(list_checkpoints(ae_cfg.run.path / "checkpoints"))  # an interrupted first try continues
    code = train_autoencoder(ae_cfg, resume=resume)
    if code != 0:
        raise Stopped(f"autoencoder training ({ae_cfg.run.path})", code)
    if not path.is_file():
        raise RuntimeError(f"train_autoencoder finished without writing {path} (model.autoencoder.checkpoint)")
    return f"trained {path}"


def _features(cfg, log, build: bool = True) -> str:
    path = cfg.annotation.weights
    if path is None:
        raise ConfigError("annotation.weights", "prepare.features needs a path to write the encoder to")
    if path.is_file():
        from sgdm.annotation.annotate import data_settings
        from sgdm.features_pretrain.train import pretrain_record_differs

        differ = pretrain_record_differs(path, cfg.annotation.backbone, dict(cfg.annotation.backbone_kwargs),
                                         cfg.prepare.pretrain, data_settings(cfg.data))
        if differ is None:
            return f"reused {path} (it records no pretraining settings: made elsewhere or by an older sgdm)"
        if differ:
            raise ConfigError("annotation.weights", f"encoder {path} was pretrained with other settings "
                                                    f"({', '.join(differ)} differ); delete it to pretrain again, "
                                                    "or point annotation.weights elsewhere")
        return f"reused {path}"
    if not build:
        raise _not_built("features", f"the encoder {path} (annotation.weights)")
    from sgdm.features_pretrain.run import pretrain_from_config
    from sgdm.features_pretrain.train import PretrainStopped

    try:
        pretrain_from_config(cfg, path, log=log)
    except PretrainStopped:  # SIGTERM with prepare.pretrain.checkpoint_every: its checkpoint is written
        raise Stopped("feature pretraining", 143) from None
    return f"pretrained {path}"


def _annotations(cfg, log, build: bool = True) -> str:
    store = cfg.annotation.store
    if reusable_store(cfg.annotation, cfg.data):
        return f"reused {store}"
    if not build:
        raise _not_built("annotations", f"the annotation store {store} (annotation.store)")
    if cfg.annotation.source == "self" and cfg.annotation.weights is not None and not cfg.annotation.weights.is_file():
        raise ConfigError("annotation.weights", f"{cfg.annotation.weights} does not exist; set prepare.features: true "
                                                "to pretrain it, or point it at an encoder")
    from sgdm.annotation.annotate import annotate

    result = annotate(cfg, evaluate=True, log=log, progress=False)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())
    return f"annotated {result.num_images} images into {store}" + (f" ({scores})" if scores else "")


_STAGES: list[tuple[str, Callable]] = [
    ("dataset", _dataset), ("autoencoder", _autoencoder), ("features", _features), ("annotations", _annotations),
]


def prepare(cfg, log: Callable[[str], None] = _stderr, build: bool = True) -> dict[str, str]:
    """Run the stages whose ``cfg.prepare`` flag is set; returns what each did (also logged).
    ``build=False`` (a run of several processes) only reuses: a missing artefact is a ``ConfigError``."""
    done = {}
    for name, stage in _STAGES:
        if not getattr(cfg.prepare, name):
            continue
        start = time.time()
        done[name] = stage(cfg, log, build)
        log(f"prepare {name}: {done[name]} ({time.time() - start:.0f}s)")
    return done
