"""The same experiment with another guidance: the paper's comparison grid (image-level, box and mask guidance).

One network, one budget, only the guidance differs: none, labels, boxes or
masks, from self-annotation (``self``) or ground truth (``gt``). Each variant
gets its own annotation store (``<store_root>/<source>-<kind>``) and run
directory, so variants never overwrite each other and are reused when present.
"""
from __future__ import annotations

import pathlib

__all__ = ["guidance_variant", "variant_name", "train_variant", "seed_continuation", "VARIANTS"]

# (kind, source) rows of the paper's tables, in print order
VARIANTS = [("none", "self"), ("label", "gt"), ("label", "self"), ("box", "self"), ("box", "gt"),
            ("mask", "self"), ("mask", "gt")]


def guidance_variant(cfg, kind: str, source: str, *, classes: int, store_root: pathlib.Path, run_dir: pathlib.Path,
                     run_name: str, max_steps: int | None = None):
    """A copy of ExperimentConfig ``cfg`` guided by ``kind``/``source`` with K = ``classes``.

    Nothing is prepared or reported by the copy (``prepare`` flags off); the
    first stage and the encoder are shared with ``cfg``.
    """
    from sgdm.config.core import from_dict, to_dict
    from sgdm.config.schema import ExperimentConfig

    data = to_dict(cfg)
    guidance = data["model"]["guidance"]
    guidance.update(kind=kind, source=source, num_classes=0 if kind == "none" else classes)
    if kind == "none":
        guidance["drop_prob"] = 0.0
    elif guidance["drop_prob"] == 0.0:
        guidance["drop_prob"] = 0.1
    ann = data["annotation"]
    ann.update(granularity="label" if kind == "none" else kind, source=source, store=str(store_root / f"{source}-{kind}"))
    if kind == "box":
        ann["lost"]["num_clusters"] = classes
    elif kind != "none":
        ann["num_classes"] = classes
    data["run"].update(dir=str(run_dir), name=run_name)
    if max_steps is not None:
        data["train"]["max_steps"] = max_steps
    data["prepare"].update(dataset=False, autoencoder=False, features=False, annotations=False, report=False)
    return from_dict(ExperimentConfig, data)


def variant_name(kind: str, source: str) -> str:
    """A variant's run name from its guidance ``kind`` and annotation ``source``: ``self-box``,
    ``gt-mask``, ...; ``no-guidance`` for kind ``none``."""
    return "no-guidance" if kind == "none" else f"{source}-{kind}"



def train_variant(vcfg, log) -> pathlib.Path:
    """Annotate (if its store is missing) and train variant ``vcfg``; reuse a finished run trained with
    these settings (one trained with others is refused by name). Returns the run dir."""
    from sgdm.quickstart.stages import reusable_store, run_settings_differ

    run_path = vcfg.run.path
    if (run_path / "pipeline").exists():
        differ = run_settings_differ(vcfg)
        if differ:
            from sgdm.config.core import ConfigError

            raise ConfigError(differ[0], f"variant run {run_path} was trained with other settings ({', '.join(differ)} "
                                         f"differ from its config.yaml); delete {run_path} to train it again")
        log(f"variant {run_path.name}: reusing {run_path / 'pipeline'}")
        return run_path
    if vcfg.model.guidance.kind != "none" and not reusable_store(vcfg.annotation, vcfg.data):
        from sgdm.annotation.annotate import annotate

        annotate(vcfg, evaluate=vcfg.annotation.source == "self", log=log, progress=False)
    from sgdm.training.checkpoint import list_checkpoints
    from sgdm.training.run import train

    resume = bool(list_checkpoints(run_path / "checkpoints"))
    code = train(vcfg, resume=resume)
    if code != 0:
        from sgdm.quickstart.stages import Stopped

        raise Stopped(f"training variant {run_path}", code)
    return run_path


def seed_continuation(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path | None:
    """Start run dir ``dst`` where run ``src`` stopped: its newest valid checkpoint and its
    ``config.yaml`` are copied (each atomically), so that training ``dst`` with ``resume``
    continues ``src`` exactly, to ``dst``'s own ``train.max_steps``, while ``src`` (its
    exported pipeline, its evaluation) stays as it was.

    Does nothing when ``dst`` already has checkpoints or an exported pipeline (a continuation
    under way or finished); returns the checkpoint copied, else None. A ``src`` without a
    valid checkpoint is an error that names it."""
    from sgdm.atomic import atomic_copy
    from sgdm.training.checkpoint import find_last_valid, list_checkpoints

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if (dst / "pipeline").exists() or list_checkpoints(dst / "checkpoints"):
        return None
    ckpt = find_last_valid(src / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{src / 'checkpoints'}: no valid checkpoint to continue from")
    if (src / "config.yaml").is_file():  # lets the resume check that the continuation is the same run
        atomic_copy(src / "config.yaml", dst / "config.yaml")
    atomic_copy(ckpt, dst / "checkpoints" / ckpt.name)
    return dst / "checkpoints" / ckpt.name
