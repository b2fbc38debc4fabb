"""Tiny pipelines (16 px images, 2x8x8 latents, K = 3) with random, non-zero weights."""
from __future__ import annotations

import torch

from sgdm.pipeline import SelfGuidedPipeline
from tests.models.helpers import randomize_

K = 3


def tiny_config(kind: str = "label", parameterization: str = "eps") -> dict:
    return {
        "model": {
            "autoencoder": {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 4, "resolution": 16,
                            "embed_dim": 2, "z_channels": 2, "scale_factor": 0.5},
            "unet": {"in_channels": 2, "out_channels": 2, "channels": 8, "channel_mult": [1, 2],
                     "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 2, "norm_groups": 4,
                     "image_size": 8},
            "guidance": {"kind": kind, "num_classes": K if kind != "none" else 0},
        },
        "diffusion": {"timesteps": 50, "parameterization": parameterization},
        "sampler": {"steps": 5, "guidance_scale": 2.5},
        "run": {"name": "tiny"},  # other sections travel along untouched
    }


def tiny_pipeline(kind: str = "label", parameterization: str = "eps", seed: int = 0) -> SelfGuidedPipeline:
    pipe = SelfGuidedPipeline.from_config(tiny_config(kind, parameterization))
    g = torch.Generator().manual_seed(seed)
    randomize_(pipe.unet, g, std=0.2)  # the UNet's output conv starts at zero: make eps depend on the input
    return pipe
