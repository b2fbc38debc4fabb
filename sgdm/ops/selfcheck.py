"""Check the installed ops against their float64 references on this machine's devices.

What ``sgdm-ldm info --check`` runs after an install, and what ``benchmarks/gpu_check.sh`` runs under
compute-sanitizer (through the benchmarks' ``--smoke``): every op once, forward and backward, on
small odd shapes that exercise partial tiles (channels-last and per-sample affines for
GroupNorm+SiLU; Nq != Nk and each head dim for attention; a per-sample alpha, noise and x0 clipping
for the guided DDIM step). Whatever implementation :func:`sgdm.ops.backend` names runs: the
compiled kernel where one is registered for the device, the reference otherwise.

The error of a check is ``max |got - want| / max(1, max |want|)`` against the op's reference fed
float64 copies of the same inputs, over the output and, for the differentiable ops, every input
gradient under one random upstream gradient. The tolerances are loose enough for a correct kernel
at the dtype (bf16 keeps 8 bits of mantissa) and tight enough that a wrong index or a missing term
fails by orders of magnitude.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import torch

from sgdm import ops
from sgdm.ops.attention import SUPPORTED_HEAD_DIMS, attention_ref
from sgdm.ops.reference import group_norm_silu_ref, guided_ddim_step_ref

__all__ = ["OpCheck", "TOLERANCES", "check_ops", "default_dtypes", "relative_error"]

TOLERANCES = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
OPS = ("group_norm_silu", "guided_ddim_step", "attention")


@dataclasses.dataclass(frozen=True)
class OpCheck:
    """One op on one case: ``error`` against the float64 reference, ``ok`` when within ``tolerance``
    (NaN or inf anywhere is never ok)."""

    op: str
    case: str
    device: str
    dtype: str
    backend: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # False for NaN

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (f"{self.op:<16} {self.case:<52} {self.device:<6} {self.dtype:<9} {self.backend:<11} "
                f"error {self.error:.1e} (tolerance {self.tolerance:.0e})  {verdict}")


def default_dtypes(device: torch.device | str) -> tuple[torch.dtype, ...]:
    """float32 and bfloat16 on the CPU; float16 too on CUDA (its tensor-core kernels)."""
    if torch.device(device).type == "cuda":
        return torch.float32, torch.float16, torch.bfloat16
    return torch.float32, torch.bfloat16


def relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """The worst over pairs of max |got - want| / max(1, max |want|), in float64; NaN when ``got``
    holds a non-finite value. What :data:`TOLERANCES` bound (the benchmarks check with it too)."""
    worst = 0.0
    for g, w in zip(got, want):
        g, w = g.detach().double().cpu(), w.detach().double().cpu()
        if not bool(torch.isfinite(g).all()):
            return float("nan")
        worst = max(worst, float((g - w).abs().max()) / max(1.0, float(w.abs().max())))
    return worst


def _compare(fn: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
             grad_inputs: int, generator: torch.Generator) -> float:
    """Error of ``fn(*inputs)`` and of its gradients in the first ``grad_inputs`` inputs, against
    ``ref`` on float64 copies (the same upstream gradient, drawn from ``generator``, for both)."""
    leaves = [t.detach().requires_grad_(i < grad_inputs) for i, t in enumerate(inputs)]
    refs = [t.detach().double().requires_grad_(i < grad_inputs) for i, t in enumerate(inputs)]
    out, want = fn(*leaves), ref(*refs)
    if not grad_inputs:
        return relative_error([out], [want])
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves[:grad_inputs], upstream.to(out.device, out.dtype))
    want_grads = torch.autograd.grad(want, refs[:grad_inputs], upstream.to(want.device))
    return relative_error([out, *grads], [want, *want_grads])


def _randn(shape, generator: torch.Generator, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _group_norm_cases(device, dtype, gen) -> Iterable[tuple[str, float]]:
    # (shape, groups, channels-last, per-sample [N, C] affine as in the UNet's scale-shift blocks)
    for shape, groups, channels_last, per_sample in (((2, 12, 5, 7), 3, False, False),
                                                     ((3, 16, 4, 6), 8, True, False),
                                                     ((1, 6, 1, 1), 6, False, False),
                                                     ((2, 12, 5, 7), 3, False, True),
                                                     ((3, 16, 4, 6), 8, True, True)):
        x = _randn(shape, gen, device, dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        affine = shape[:2] if per_sample else shape[1:2]
        w, b = (1 + 0.5 * _randn(affine, gen, device, dtype)), 0.5 * _randn(affine, gen, device, dtype)
        case = "x".join(map(str, shape)) + f" g={groups}" + (" channels-last" if channels_last else "") + \
            (" per-sample affine" if per_sample else "")
        error = _compare(lambda x, w, b: ops.group_norm_silu(x, groups, w, b),
                         lambda x, w, b: group_norm_silu_ref(x, groups, w, b), [x, w, b], 3, gen)
        yield f"fwd+bwd {case}", error


def _guided_ddim_cases(device, dtype, gen) -> Iterable[tuple[str, float]]:
    shape = (3, 4, 7, 5)
    x, eps_cond, eps_uncond, noise = (_randn(shape, gen, device, dtype) for _ in range(4))
    alpha_t = torch.tensor([0.2, 0.5, 0.9], device=device)
    for eta, clip in ((0.0, None), (0.5, 1.0)):
        def step(x, ec, eu, nz, fn):
            return torch.cat(fn(x, ec, alpha_t, 0.95, eu, 2.0, eta, nz if eta else None, clip))
        error = _compare(lambda *t: step(*t, ops.guided_ddim_step),
                         lambda *t: step(*t, guided_ddim_step_ref), [x, eps_cond, eps_uncond, noise], 0, gen)
        yield f"fwd {'x'.join(map(str, shape))} w=2 eta={eta} clip={clip}", error


def _attention_cases(device, dtype, gen) -> Iterable[tuple[str, float]]:
    for head_dim in SUPPORTED_HEAD_DIMS:
        q = _randn((2, 3, 77, head_dim), gen, device, dtype)
        k, v = (_randn((2, 3, 130, head_dim), gen, device, dtype) for _ in range(2))
        yield f"fwd+bwd 2x3 Nq=77 Nk=130 D={head_dim}", _compare(ops.attention, attention_ref, [q, k, v], 3, gen)


_CASES = {"group_norm_silu": _group_norm_cases, "guided_ddim_step": _guided_ddim_cases,
          "attention": _attention_cases}


def check_ops(device: torch.device | str = "cpu", dtypes: Sequence[torch.dtype] | None = None,
              op_names: Sequence[str] = OPS, seed: int = 0) -> list[OpCheck]:
    """Every op in ``op_names`` on ``device`` at each of ``dtypes`` (:func:`default_dtypes` when None),
    through whatever implementation runs there; one :class:`OpCheck` per case. Inputs come from a
    CPU generator seeded with ``seed``, so every device sees the same values."""
    device = torch.device(device)
    unknown = sorted(set(op_names) - set(OPS))
    if unknown:
        raise ValueError(f"op_names: unknown ops {unknown}; the ops are {list(OPS)}")
    dtypes = default_dtypes(device) if dtypes is None else tuple(dtypes)
    for dtype in dtypes:
        if dtype not in TOLERANCES:
            raise ValueError(f"dtypes: {dtype} is not checked; choose from {list(TOLERANCES)}")
    gen = torch.Generator().manual_seed(seed)
    results = []
    for name in op_names:
        backend = ops.backend(device.type)[name]
        for dtype in dtypes:
            for case, error in _CASES[name](device, dtype, gen):
                results.append(OpCheck(name, case, str(device), str(dtype).replace("torch.", ""), backend, error,
                                       TOLERANCES[dtype]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return results
