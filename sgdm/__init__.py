"""sgdm: self-guided latent diffusion models (Hu et al., CVPR 2023).

Heavy submodules are imported lazily so that ``import sgdm`` stays cheap (it imports
no torch). Sampling from a trained model::

    import torch
    from sgdm import SelfGuidedPipeline
    pipe = SelfGuidedPipeline.from_pretrained("runs/X", device="cuda")
    images = pipe(4, cluster=17, generator=torch.Generator().manual_seed(0))

The packages: ``sgdm.pipeline`` (sampling API), ``sgdm.models`` (UNet, KL autoencoder),
``sgdm.diffusion`` (schedule, samplers, guidance), ``sgdm.ops`` (fused kernels),
``sgdm.annotation`` (self-annotation), ``sgdm.training``, ``sgdm.evaluation``,
``sgdm.data``, ``sgdm.config``; ``sgdm-ldm`` is the command line.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "SelfGuidedPipeline": "sgdm.pipeline",
}

__all__ = ["SelfGuidedPipeline", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgdm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # the lazy names too: tab completion lists dir()
