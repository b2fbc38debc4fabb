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

from sgdm._lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "SelfGuidedPipeline": "sgdm.pipeline",
}

__all__ = ["SelfGuidedPipeline", "__version__"]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
