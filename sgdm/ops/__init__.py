"""Fused operations. The library calls these, never a kernel or reference directly.

(Initial version: reference implementations only; the compiled extension
replaces them where available.)
"""
from sgdm.ops.reference import attention_ref as attention
from sgdm.ops.reference import group_norm_silu_ref as group_norm_silu
from sgdm.ops.reference import guided_ddim_step_ref as guided_ddim_step


def backend() -> dict:
    return {"group_norm_silu": "reference", "guided_ddim_step": "reference", "attention": "reference"}


__all__ = ["attention", "backend", "group_norm_silu", "guided_ddim_step"]
