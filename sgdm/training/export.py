"""Export the EMA denoiser and the first stage for ``SelfGuidedPipeline.from_pretrained``."""
from __future__ import annotations

import copy
import pathlib

from sgdm.config.core import to_dict

__all__ = ["export_pipeline"]


def export_pipeline(cfg, module, path: pathlib.Path) -> pathlib.Path:
    """Write ``path/model.safetensors`` (+ config.yaml) with the EMA UNet weights; returns the file."""
    from sgdm.pipeline import SelfGuidedPipeline

    unet = copy.deepcopy(module.ema).cpu().float()
    first_stage = copy.deepcopy(module.first_stage).cpu().float()
    pipe = SelfGuidedPipeline(unet, first_stage, cfg.diffusion, cfg.model.guidance, cfg.sampler, to_dict(cfg))
    return pipe.save_pretrained(path)
