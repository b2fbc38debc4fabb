"""sgdm: self-guided latent diffusion models (Hu et al., CVPR 2023).

Heavy submodules are imported lazily so that ``import sgdm`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "SelfGuidedPipeline": "sgdm.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgdm' has no attribute {name!r}")
