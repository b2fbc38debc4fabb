"""Fused operations. The library calls these, never a kernel or reference directly.

Each op runs its compiled kernel (``sgdm._C``: per-ISA CPU code, CUDA when built)
where one exists for the input's device, and its plain-PyTorch reference
(:mod:`sgdm.ops.reference`) otherwise or when ``SGDM_KERNELS=0`` is set.
:func:`backend` says which one runs.
"""
from __future__ import annotations

from sgdm.ops import _extension
from sgdm.ops.group_norm_silu import group_norm_silu
from sgdm.ops.guided_ddim_step import guided_ddim_step
from sgdm.ops.attention import attention

_OPS = ("group_norm_silu", "guided_ddim_step", "attention")


def backend(device_type: str = "cpu") -> dict[str, str]:
    """Implementation of each op on ``device_type`` ("cpu" or "cuda").

    Values: "cpu-default" / "cpu-avx2" / "cpu-avx512" (compiled CPU kernel and the ISA it
    runs), "cuda" (compiled CUDA kernel) or "reference" (plain PyTorch).
    """
    return {op: _extension.backend(op, device_type) for op in _OPS}


__all__ = ["attention", "backend", "group_norm_silu", "guided_ddim_step"]
