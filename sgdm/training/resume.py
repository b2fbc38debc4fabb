"""Which config changes ``--resume`` accepts: the saved ``config.yaml`` against the new config, leaf by leaf.

A resume must continue the same run, so every setting that can change what is trained (seed, data,
networks, schedule, optimiser, clipping, precision, guidance labels) has to equal the saved one. The
exceptions are listed here and nowhere else: :data:`MAY_DIFFER` for every trainer (where and how fast it
runs, how long, what it logs and writes), :data:`UNUSED_BY` for settings a trainer never reads.
A key is allowed when it or one of its parent sections is listed. A key the saved config lacks (written
by an older sgdm) is not compared, except the ``data.*`` keys of :data:`sgdm.data.config.ADDED_KEYS`:
those count at the value the older run read its data with (a run saved before
``data.exif_orientation`` existed read the pixels as stored, so resuming it with ``apply`` is refused).

Beyond the config: a run directory belongs to the trainer that wrote its checkpoints
(:func:`check_checkpoint_trainer`), whose weights fit the networks built now (:func:`check_checkpoint_fits`),
and a resumed denoiser keeps the first stage of its checkpoints (:func:`keep_run_first_stage`).
"""
from __future__ import annotations

import pathlib
from typing import Any, Iterator

from sgdm.config.core import ConfigError, absolute_paths, dump_yaml
from sgdm.config.schema import ExperimentConfig, recorded_config
from sgdm.data.config import ADDED_KEYS

__all__ = ["MAY_DIFFER", "UNUSED_BY", "check_resume_compatible", "resume_differences", "check_checkpoint_trainer",
           "check_checkpoint_fits", "keep_run_first_stage"]

# setting -> why changing it on a resume cannot change the trained weights
MAY_DIFFER: dict[str, str] = {
    "run.dir": "where the run lives (a moved or copied run directory)",
    "run.name": "where the run lives (a moved or copied run directory)",
    "data.num_workers": "loader processes; the samples and their order are the trainer's",
    "data.on_bad_image": "whether an unreadable file stops the run; readable images are unchanged",
    "data.val_labels": "the ground truth of ImageNet's flat val split; training reads the train split",
    "model.unet.gradient_checkpointing": "recomputes activations to save memory; same values",
    "train.compile": "the same network, with kernels fused by torch.compile (float rounding may differ)",
    "train.compile_mode": "the same network, with kernels fused by torch.compile (float rounding may differ)",
    "annotation.num_workers": "loader processes of sgdm-ldm annotate; training reads the store",
    "train.max_steps": "the budget",
    "train.accelerator": "where it runs; train.batch_size is global, so the samples do not change",
    "train.devices": "where it runs; train.batch_size is global, so the samples do not change",
    "train.num_nodes": "where it runs; train.batch_size is global, so the samples do not change",
    "train.strategy": "where it runs; train.batch_size is global, so the samples do not change",
    "train.checkpoint_every": "bookkeeping",
    "train.keep_checkpoints": "bookkeeping",
    "train.log_every": "bookkeeping",
    "train.logger": "bookkeeping",
    "train.progress_bar": "bookkeeping",
    "train.on_nan": "what a fault does; finite steps are unchanged",
    "train.max_consecutive_nan": "what a fault does; finite steps are unchanged",
    "train.sample_every": "sample grids are drawn from the EMA weights, outside training",
    "train.sample_scales": "sample grids are drawn from the EMA weights, outside training",
    "train.sample_steps": "sample grids are drawn from the EMA weights, outside training",
    "train.sample_per_row": "sample grids are drawn from the EMA weights, outside training",
    "train.sample_max_clusters": "sample grids are drawn from the EMA weights, outside training",
    "train.cache_dir": "where the latent cache lives; a missing one is rebuilt identically",
    "train.export_pipeline": "written after training",
    "sampler": "sampling after training",
    "eval": "evaluation after training",
    "prepare": "what is prepared before training; the prepared files are compared through their paths",
}

# trainer -> settings it does not read
UNUSED_BY: dict[str, tuple[str, ...]] = {
    "diffusion": ("model.autoencoder.loss",),  # the first stage's own training loss
    "autoencoder": ("model.unet", "model.guidance", "model.autoencoder.checkpoint", "diffusion", "annotation",
                    "train.weight_decay", "train.betas", "train.adam_eps", "train.warmup_steps",
                    "train.grad_clip", "train.ema_decay", "train.ema_warmup", "train.cache_latents",
                    "train.cache_shard_size", "train.compile", "train.compile_mode"),
}


def _leaves(data: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf; lists are leaves."""
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    else:
        yield path, data


def _allowed(key: str, unused: tuple[str, ...]) -> bool:
    parts = key.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return bool(prefixes & (MAY_DIFFER.keys() | set(unused)))


def resume_differences(old: dict, new: dict, trainer: str = "diffusion") -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of every leaf that must not change, in config order."""
    unused = UNUSED_BY[trainer]
    saved = {**{f"data.{k}": v for k, v in ADDED_KEYS.items()}, **dict(_leaves(old))}
    return [(key, saved[key], value) for key, value in _leaves(new)
            if key in saved and saved[key] != value and not _allowed(key, unused)]


def _short(value: Any) -> str:
    text = repr(value)  # paths and names in full; a long list shortened
    return text if len(text) <= 60 or isinstance(value, str) else text[:57] + "..."


def check_resume_compatible(cfg: ExperimentConfig, saved: pathlib.Path, trainer: str = "diffusion") -> None:
    """Refuse to resume with a setting that would change the run; the error names the first differing key."""
    import yaml

    if not saved.is_file():
        _say_not_compared(saved)
        return
    # a config saved before paths were recorded absolute holds them as typed: resolve them the same way
    old = absolute_paths(ExperimentConfig, yaml.safe_load(saved.read_text()) or {})
    new = yaml.safe_load(dump_yaml(recorded_config(cfg)))
    differences = resume_differences(old, new, trainer)
    if differences:
        key, before, after = differences[0]
        others = [k for k, _, _ in differences[1:]]
        more = f" (and {', '.join(others[:5])}{', ...' if len(others) > 5 else ''})" if others else ""
        raise ConfigError(key, f"differs from the run's saved config {saved} ({_short(before)} -> {_short(after)})"
                               f"{more}; resuming would not continue the same run. Use the saved value or start a "
                               f"new run.name")


def _say_not_compared(saved: pathlib.Path) -> None:
    """A run directory with checkpoints but no ``config.yaml`` (checkpoints copied in by hand): nothing to
    compare the config with, so a changed setting would go unnoticed; say so rather than stay silent."""
    import sys

    from sgdm.launch import current

    if current().is_first:
        print(f"sgdm: {saved} is missing: the settings this run's checkpoints were trained with are unknown, so "
              f"nothing checks that this config continues the same run (a changed seed, data or network would "
              f"go unnoticed); copy the run's config.yaml there to have them compared", file=sys.stderr, flush=True)


COMMANDS = {"diffusion": "`sgdm-ldm train`", "autoencoder": "`sgdm-ldm train-autoencoder`"}


def _read(ckpt: pathlib.Path) -> dict:
    """The checkpoint as saved, its tensors memory-mapped: read only where used."""
    import torch

    return torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)


def check_checkpoint_trainer(ckpt: pathlib.Path, trainer: str) -> None:
    """Refuse to resume checkpoint ``ckpt`` with the other trainer (one config, both commands, one run.name):
    its ``sgdm`` state tells them apart, the denoiser's counts EMA updates. Other files are left to the
    trainer's own load."""
    state = _read(ckpt).get("sgdm")
    if not isinstance(state, dict):
        return
    written_by = "diffusion" if "ema_updates" in state else "autoencoder"
    if written_by != trainer:
        raise ConfigError("run.name", f"{ckpt} is a checkpoint of {COMMANDS[written_by]}, not of {COMMANDS[trainer]}"
                                      f"; this run directory belongs to that run. Give this one its own run.name")


def check_checkpoint_fits(module, ckpt: pathlib.Path) -> None:
    """The weights in checkpoint ``ckpt`` are those of ``module`` (before Lightning wraps it), name for name and
    shape for shape. A checkpoint of another sgdm version (a parameter renamed or added since) stops here, in
    one line naming the keys, not in Lightning's strict load with a traceback."""
    saved = _read(ckpt).get("state_dict", {})
    own = module.state_dict()
    found = [(what, keys) for what, keys in (
        ("missing", [k for k in own if k not in saved]),
        ("unexpected", [k for k in saved if k not in own]),
        ("other shapes", [f"{k} {list(saved[k].shape)} (here {list(own[k].shape)})" for k in own
                          if k in saved and saved[k].shape != own[k].shape])) if keys]
    if found:
        what = "; ".join(f"{what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''} ({len(keys)})"
                         for what, keys in found)
        raise ConfigError("run.name", f"{ckpt}: its weights do not fit the networks built from this config ({what}); "
                                      f"written by another sgdm version? Resume it with the version that wrote it, "
                                      f"or start a new run.name")


def keep_run_first_stage(first_stage, ckpt: pathlib.Path, source: str) -> None:
    """Load the first stage of the denoiser's checkpoint ``ckpt`` into ``first_stage`` (built from ``source``,
    ``model.autoencoder.checkpoint``), before the latent cache is checked or encoded with it. Lightning
    restores these weights anyway, but only after the cache is made: a file replaced in place since the run
    started would have re-encoded it with other weights than the scale factor, sample grids and export use.
    Says so when the weights differ: the run goes on with its own, as an uninterrupted run would."""
    import sys

    import torch

    from sgdm.launch import current

    state = _read(ckpt)["state_dict"]
    saved = {k[len("first_stage."):]: v for k, v in state.items() if k.startswith("first_stage.")}
    differs = any(name != "scale_factor" and (name not in saved or not torch.equal(value, saved[name]))
                  for name, value in first_stage.state_dict().items())
    first_stage.load_state_dict(saved)
    if differs and current().is_first:
        print(f"sgdm: model.autoencoder.checkpoint {source} holds other weights than the first stage this run "
              f"started with; it goes on with its own, kept in {ckpt} (start a new run.name to train on the new "
              f"weights)", file=sys.stderr, flush=True)
