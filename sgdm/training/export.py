"""Export the EMA denoiser and the first stage for ``SelfGuidedPipeline.from_pretrained``: at the end
of training (:func:`export_pipeline`), or from a checkpoint of a run that has not finished
(:func:`pipeline_from_checkpoint`, what ``sgdm-ldm sample`` uses when a run has no ``pipeline/``)."""
from __future__ import annotations

import pathlib
from typing import Optional

from sgdm.config.core import to_dict

__all__ = ["export_pipeline", "checkpoint_for", "pipeline_from_checkpoint"]


def _pipeline(cfg, unet, first_stage):
    from sgdm.pipeline import SelfGuidedPipeline

    return SelfGuidedPipeline(unet, first_stage, cfg.diffusion, cfg.model.guidance, cfg.sampler, to_dict(cfg))


def _modules(cfg, states: dict, source: str) -> tuple:
    """(UNet, first stage) of ``cfg.model`` holding ``states["ema."]`` and ``states["first_stage."]``
    (:func:`sgdm.pipeline.empty_modules`: built without initialising the weights they replace)."""
    from sgdm.pipeline import assign_state, empty_modules

    modules = empty_modules(cfg.model)
    for (prefix, state), module in zip(states.items(), modules):
        try:
            missing, unexpected = assign_state(module, state)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"{source}: its {prefix[:-1]} weights do not fit the config: {str(err)[:300]}") from None
        if missing or unexpected:
            raise ValueError(f"{source}: its {prefix[:-1]} weights do not fit the config: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
    return modules


def export_pipeline(cfg, module, path: pathlib.Path) -> pathlib.Path:
    """Write ``path/model.safetensors`` (+ config.yaml) with the EMA UNet weights; returns the file.
    Each weight is copied straight to the CPU: no copy of the modules is made on the training device."""
    states = {prefix: {k: v.detach().to("cpu", copy=True) for k, v in part.state_dict().items()}
              for prefix, part in (("ema.", module.ema), ("first_stage.", module.first_stage))}
    unet, first_stage = _modules(cfg, states, "the training module")
    step = getattr(module, "step", None)  # checkpoint_for compares it with the run's newest checkpoint
    return _pipeline(cfg, unet.eval(), first_stage.eval()).save_pretrained(
        path, metadata=None if step is None else {"step": str(int(step))})


def checkpoint_for(path: pathlib.Path) -> Optional[pathlib.Path]:
    """The training checkpoint to build a pipeline from: ``path`` itself when it names a ``.ckpt``; the
    newest valid checkpoint of a run directory that has no exported ``pipeline/`` yet (stopped or still
    running), or whose export is older than that checkpoint (a finished run continued with a higher
    ``train.max_steps``: its export is of the earlier end); None otherwise (an up-to-date export, an
    export that does not record its step, or no run)."""
    from sgdm.pipeline import WEIGHTS_NAME
    from sgdm.training.checkpoint import find_last_valid, list_checkpoints

    path = pathlib.Path(path)
    if path.suffix == ".ckpt":
        return path
    if not path.is_dir():
        return None
    export = next((f for f in (path / WEIGHTS_NAME, path / "pipeline" / WEIGHTS_NAME) if f.is_file()), None)
    if export is None:
        return find_last_valid(path / "checkpoints")
    step = _export_step(export)
    checkpoints = list_checkpoints(path / "checkpoints")
    if step is None or not checkpoints or checkpoints[-1][0] <= step:
        return None
    newest = find_last_valid(path / "checkpoints")
    return newest if newest is not None and next(s for s, p in checkpoints if p == newest) > step else None


def _export_step(file: pathlib.Path) -> Optional[int]:
    """The training step an export was written at (its ``step`` metadata), or None where it says none."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except (SafetensorError, OSError, KeyError, ValueError):  # no step, or damaged: from_pretrained says so
        return None


def pipeline_from_checkpoint(ckpt: pathlib.Path):
    """(pipeline, step): what training would export had it ended at checkpoint ``ckpt``
    (``RUN/checkpoints/step-*.ckpt``): its EMA UNet and first stage, with the networks and sampler
    of ``RUN/config.yaml``. Raises FileNotFoundError / ValueError naming the file."""
    import torch

    from sgdm.config.schema import load_recorded
    from sgdm.training.checkpoint import is_valid_checkpoint

    ckpt = pathlib.Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint")
    config = ckpt.parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{ckpt}: no {config} beside it (the run's config.yaml names its networks; "
                                f"a checkpoint is read in its run's checkpoints/ folder)")
    if not is_valid_checkpoint(ckpt):
        raise ValueError(f"{ckpt}: not a complete checkpoint (it fails its integrity check); use an earlier one")
    cfg = load_recorded(config)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = saved.get("state_dict", {})
    states = {prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
              for prefix in ("ema.", "first_stage.")}
    for prefix, part in states.items():
        if not part:
            raise ValueError(f"{ckpt}: holds no '{prefix}*' weights; not a checkpoint of `sgdm-ldm train`")
    unet, first_stage = _modules(cfg, states, f"{ckpt} (with {config})")
    step = int((saved.get("sgdm") or {}).get("step", saved.get("global_step", 0)))
    return _pipeline(cfg, unet.eval(), first_stage.eval()), step
