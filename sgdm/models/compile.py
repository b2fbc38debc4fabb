"""``torch.compile`` of a network in place, for training (``train.compile``) and sampling
(``SelfGuidedPipeline.compile``, ``sgdm-ldm sample|eval --compile``).

``nn.Module.compile`` keeps the module itself: its parameters, buffers and state-dict keys are
unchanged (no ``_orig_mod.`` prefix), so checkpoints, the EMA copy, exports and resumes read and
write the same files as without it. The first call with a new input shape compiles (tens of
seconds to minutes); later calls run the compiled graph. The UNet traces to one graph with no
break for every guidance kind, with gradient checkpointing too, and sgdm's fused ops
(``sgdm.ops``) enter it as custom ops with fake kernels.

Modes: ``default`` (Inductor's fusion) and ``max-autotune-no-cudagraphs`` (also benchmarks
matmul/conv configurations; a longer compile). The CUDA-graph modes (``reduce-overhead``,
``max-autotune``) are not offered: a CUDA graph reuses its output memory on the next call, and
the training step and the samplers keep earlier outputs (losses to log, the previous eps of
DPM-Solver++(2M)).
"""
from __future__ import annotations

from typing import Callable, Union

from torch import nn

__all__ = ["COMPILE_MODES", "compile_network"]

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def _backend() -> Union[str, Callable]:
    """The torch.compile backend: Inductor (tests replace it with a cheap one that records graphs)."""
    return "inductor"


def compile_network(module: nn.Module, mode: str = "default") -> nn.Module:
    """Compile ``module``'s forward in place with ``torch.compile`` (see the module docstring); returns it."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    backend = _backend()
    # the mode is Inductor's (other backends refuse one); "default" is Inductor's own default
    options = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    module.compile(backend=backend, **options)
    return module
