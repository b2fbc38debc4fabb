"""Which config changes ``--resume`` accepts: the saved ``config.yaml`` against the new config, leaf by leaf.

A resume must continue the same run, so every setting that can change what is trained (seed, data,
networks, schedule, optimiser, clipping, precision, guidance labels) has to equal the saved one. The
exceptions are listed here and nowhere else: :data:`MAY_DIFFER` for every trainer (where and how fast it
runs, how long, what it logs and writes), :data:`UNUSED_BY` for settings a trainer never reads.
A key is allowed when it or one of its parent sections is listed. A key the saved config lacks (written
by an older sgdm) is not compared, except the ``data.*`` keys of :data:`sgdm.data.config.ADDED_KEYS`:
those count at the value the older run read its data with (a run saved before
``data.exif_orientation`` existed read the pixels as stored, so resuming it with ``apply`` is refused).

A path setting of :data:`MOVABLE` may differ when what it points to is the same: a dataset copied to
node-local scratch (a new ``$TMPDIR`` per job), a run moved to another file system. Every start records
in the run directory what each path held (:class:`Identity`: the dataset's ids in order, their number
and file sizes, the annotation store's content digest, the first-stage file's sha256); a resume with a
moved path compares what the new path holds with that record, goes on saying so in one line when they are
equal, and refuses, naming the key, both values and what differs, when not. A run directory without the
record (started by an older sgdm) keeps refusing a moved path, saying how to record it. The dataset and
the store are compared at an unmoved path too (:mod:`sgdm.training.dataset_record`, the caller's
store check): files change in place.

Beyond the config: a run directory belongs to the trainer that wrote its checkpoints
(:func:`check_checkpoint_trainer`), whose weights fit the networks built now (:func:`check_checkpoint_fits`),
and a resumed denoiser keeps the first stage of its checkpoints (:func:`keep_run_first_stage`).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Iterator, Mapping, Optional

from sgdm.config.core import ConfigError, absolute_paths, dump_yaml
from sgdm.config.schema import ExperimentConfig, recorded_config
from sgdm.data.config import ADDED_KEYS

__all__ = ["MAY_DIFFER", "UNUSED_BY", "Identity", "MOVABLE", "check_resume_compatible", "resume_differences",
           "path_sha256", "check_checkpoint_trainer", "check_checkpoint_fits", "keep_run_first_stage"]

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


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a path setting points to, as the run directory records it at every start: the JSON file
    ``record``, whose entries ``fields`` identify the content (its others say where it was); ``what`` names
    the content in messages."""

    record: str
    fields: tuple[str, ...]
    what: str


DATASET = Identity("dataset.json", ("num_images", "ids_sha256", "files_sha256"),
                   "images (the dataset's ids, in order, and their file sizes)")
STORE = Identity("annotation_store.json", ("sha256",), "annotations (the store's content digest)")
FIRST_STAGE = Identity("first_stage.json", ("sha256",), "first-stage weights (the file's sha256)")

# path setting -> what it must still point to for a resume to accept it moved. The dataset is known by
# its ids and file sizes, not by modification times (a copy changes those) nor contents (hours to read)
MOVABLE: dict[str, Identity] = {
    "data.root": DATASET,
    "data.list_file": DATASET,  # it decides the ids and nothing else
    "data.shapes.cache_dir": DATASET,
    "annotation.store": STORE,
    "model.autoencoder.checkpoint": FIRST_STAGE,
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


def check_resume_compatible(cfg: ExperimentConfig, saved: pathlib.Path, trainer: str = "diffusion",
                            identities: Optional[Mapping[str, Callable[[], Optional[dict]]]] = None,
                            explain: Optional[Mapping[str, Callable[[dict, dict], str]]] = None) -> None:
    """Refuse to resume with a setting that would change the run; the error names the first differing key.

    ``identities``: :attr:`Identity.record` -> what the new config's paths hold now (None: nothing there),
    asked only for a moved path of :data:`MOVABLE`; without it a moved path is refused like any setting.
    ``explain``: :attr:`Identity.record` -> (recorded, now) -> what differs, in words (default: the
    fields that differ)."""
    import yaml

    if not saved.is_file():
        _say_not_compared(saved)
        return
    # a config saved before paths were recorded absolute holds them as typed: resolve them the same way
    old = absolute_paths(ExperimentConfig, yaml.safe_load(saved.read_text()) or {})
    new = yaml.safe_load(dump_yaml(recorded_config(cfg)))
    differences = resume_differences(old, new, trainer)
    # a path set or unset is a change, not a move
    moved = [d for d in differences if identities is not None and d[0] in MOVABLE and None not in d[1:]]
    fixed = [d for d in differences if d not in moved]
    if fixed:
        key, before, after = fixed[0]
        others = [k for k, _, _ in fixed[1:] + moved]
        more = f" (and {', '.join(others[:5])}{', ...' if len(others) > 5 else ''})" if others else ""
        raise ConfigError(key, f"differs from the run's saved config {saved} ({_short(before)} -> {_short(after)})"
                               f"{more}; resuming would not continue the same run. Use the saved value or start a "
                               f"new run.name")
    accepted = [_check_moved(key, before, after, saved, identities, explain or {}) for key, before, after in moved]
    from sgdm.launch import current

    if accepted and current().is_first:
        import sys

        for line in accepted:
            print(line, file=sys.stderr, flush=True)


def _check_moved(key: str, before: Any, after: Any, saved: pathlib.Path,
                 identities: Mapping[str, Callable[[], Optional[dict]]],
                 explain: Mapping[str, Callable[[dict, dict], str]]) -> str:
    """The line that accepts path ``key`` moved from ``before`` to ``after``, when it holds what the run's
    record says; else the ConfigError naming the key, both values and what differs."""
    identity = MOVABLE[key]
    record = saved.parent / identity.record
    change = f"differs from the run's saved config {saved} ({_short(before)} -> {_short(after)})"
    if not record.is_file():
        raise ConfigError(key, f"{change}, and nothing shows that {after} holds the same {identity.what}: {record} "
                               f"is missing (a run started by an older sgdm, or with nothing at {before}). Resume "
                               f"once with the saved value (a symlink at {before} pointing to {after} will do): "
                               f"that start records them, and later resumes accept a moved {key}. Or start a new "
                               f"run.name")
    recorded = json.loads(record.read_text())
    now = identities[identity.record]()
    if now is None:
        raise ConfigError(key, f"{change}, and {after} holds none of the {identity.what} recorded in {record}; "
                               f"resuming would not continue the same run. Use the saved value or start a new "
                               f"run.name")
    # a field the record lacks (written before it was recorded) is not compared
    fields = [field for field in identity.fields if field in recorded]
    differs = [f"{field} {_short(now.get(field))} (recorded {_short(recorded.get(field))})"
               for field in fields if now.get(field) != recorded.get(field)]
    if differs:
        what = explain[identity.record](recorded, now) if identity.record in explain else ", ".join(differs)
        raise ConfigError(key, f"{change}, and {after} holds other {identity.what} than recorded in {record}: "
                               f"{what}; resuming would not continue the same run. Use the saved value or start a "
                               f"new run.name")
    same = ", ".join(f"{field} {str(now[field])[:12]}" for field in fields[:2])  # a digest's first digits
    return f"sgdm: {key} moved ({before} -> {after}): accepted, it holds the same {identity.what} as {record} " \
           f"records ({same})"


def path_sha256(path: pathlib.Path) -> str:
    """SHA-256 of a file's bytes; of a folder (a diffusers model folder), of each file's relative name and
    bytes digest, in name order."""
    import hashlib

    from sgdm.annotation.features import file_sha256

    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\n{file_sha256(file)}\n".encode())
    return digest.hexdigest()


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
