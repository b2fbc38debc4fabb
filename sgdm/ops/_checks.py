"""Argument checks shared by the op wrappers: each error names the argument."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_tensor(t, name: str, op: str, min_dim: int = 0, shape_hint: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must be {shape_hint or f'at least {min_dim}-D'}, "
                         f"got shape {tuple(t.shape)}")


def check_like(t, name: str, ref: torch.Tensor, ref_name: str, op: str) -> None:
    """t must be a tensor with ref's shape, dtype and device (ref already checked as float)."""
    # The valid case first, in three comparisons: these checks run on every sampling step,
    # where the fused op itself takes only tens of microseconds on the CPU.
    if isinstance(t, torch.Tensor) and t.dtype is ref.dtype and t.shape == ref.shape and \
            t.device == ref.device:
        return
    check_float_tensor(t, name, op)
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if t.shape != ref.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {ref_name} has "
                         f"{tuple(ref.shape)}")


def check_number(v, name: str, op: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """A finite real number within [low, high] ((low, high] with low_open); returns it as float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(v).__name__}")
    v = float(v)
    below = low is not None and (v <= low if low_open else v < low)
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) v may be a SymFloat
    if not -math.inf < v < math.inf or below or (high is not None and v > high):
        if low is None and high is None:
            raise ValueError(f"{op}: {name} must be a finite number, got {v}")
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{op}: {name} must lie in {'(' if low_open else '['}{lo}, {hi}], got {v}")
    return v
