"""GroupNorm followed by SiLU, fused (forward and backward).

For x [N, C, *spatial] and G groups of C/G channels, with statistics over each
group's C/G * prod(spatial) elements, in float32 (float64 for fp64 inputs):

    z = (x - mean_{n,g}) / sqrt(var_{n,g} + eps) * weight_c + bias_c
    y = silu(z) = z * sigmoid(z)            (activation="silu"; None gives y = z)

weight and bias are each [C] (shared) or [N, C] (per sample: weight_{n,c},
bias_{n,c}). The per-sample form carries ADM's scale-shift norm in one pass,
silu(GN(x) * (1 + scale) + shift) with GN's own affine (w, b) folded in:

    weight_{n,c} = w_c * (1 + scale_{n,c}),   bias_{n,c} = b_c * (1 + scale_{n,c}) + shift_{n,c}.

The backward (dz = dy * silu'(z), xhat the normalised x, M = C/G * HW):

    dx = rstd * (dz w - mean_g(dz w) - xhat * mean_g(dz w xhat)),
    dweight_c = sum_{n,hw} dz * xhat,   dbias_c = sum_{n,hw} dz      ([C])
    dweight_{n,c} = sum_hw dz * xhat,   dbias_{n,c} = sum_hw dz      ([N, C]).

The compiled op ``sgdm::group_norm_silu`` returns (y, mean, rstd) and
``sgdm::group_norm_silu_backward`` the three gradients; this module registers
their fake kernels and the autograd formula, so the op works under
``torch.compile(fullgraph=True)`` and passes ``torch.library.opcheck``.
"""
from __future__ import annotations

import math

import torch

from sgdm.ops import _extension
from sgdm.ops._checks import check_float_tensor, check_number
from sgdm.ops.reference import group_norm_silu_ref

_OP = "group_norm_silu"
_NAME = "group_norm_silu"


def _check(x, num_groups, weight, bias, eps, activation) -> None:
    check_float_tensor(x, "x", _NAME, min_dim=2, shape_hint="[N, C, *]")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"{_NAME}: num_groups must be a positive int, got {num_groups!r}")
    batch, channels = x.shape[:2]
    if channels % num_groups:
        raise ValueError(f"{_NAME}: num_groups={num_groups} must divide the channel count "
                         f"C={channels} of x (shape {tuple(x.shape)})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_float_tensor(t, name, _NAME)
        if t.shape != (channels,) and t.shape != (batch, channels):
            raise ValueError(f"{_NAME}: {name} must have shape [C] = [{channels}] or [N, C] = "
                             f"[{batch}, {channels}] (x is {tuple(x.shape)}), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{_NAME}: {name} is on {t.device} but x is on {x.device}")
    check_number(eps, "eps", _NAME, low=0.0, low_open=True)
    if activation not in ("silu", None):
        raise ValueError(f"{_NAME}: activation must be 'silu' or None, got {activation!r}")


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5,
                    activation: str | None = "silu") -> torch.Tensor:
    """``silu(group_norm(x, num_groups, weight, bias, eps))`` for x [N, C, *].

    fp32, fp16, bf16 and fp64 inputs (statistics in fp32, fp64 for fp64); weight and
    bias of any float dtype, each [C] or [N, C] (a per-sample affine, e.g. a folded
    scale-shift modulation; see the module docstring). Contiguous and channels-last
    inputs; the output keeps a channels-last layout. Differentiable in x, weight and
    bias; their gradients come back in their shapes.
    """
    # The usual call goes straight to the op: its C++ glue and fake kernel check the tensors,
    # and a failure there is diagnosed again by _check, so the error still names the
    # argument. Without gradients it also skips the autograd.Function (together 3-4 us a
    # call; the small UNet makes 38 GroupNorm calls a step at a few tens of us each).
    if (type(num_groups) is int and type(eps) is float and 0.0 < eps < math.inf
            and (activation == "silu" or activation is None) and isinstance(x, torch.Tensor)
            and not torch.compiler.is_compiling()
            and _extension.kernels_enabled(_OP, "cpu" if x.is_cpu else x.device.type)):
        silu = activation is not None
        try:
            if torch.is_grad_enabled() and (x.requires_grad or (
                    weight is not None and weight.requires_grad) or (
                    bias is not None and bias.requires_grad)):
                return _GroupNormSiLU.apply(x, num_groups, weight, bias, eps, silu)[0]
            return _extension.call_below_autograd(torch.ops.sgdm.group_norm_silu, x, num_groups, weight,
                                                  bias, eps, silu)[0]
        except Exception:
            _check(x, num_groups, weight, bias, eps, activation)  # raises the named error
            raise
    _check(x, num_groups, weight, bias, eps, activation)
    if _extension.kernels_enabled(_OP, x.device.type):
        return _GroupNormSiLU.apply(x, num_groups, weight, bias, float(eps), activation == "silu")[0]
    return group_norm_silu_ref(x, num_groups, weight, bias, eps, activation)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """Mirrors csrc/group_norm_silu.cpp: channels-last stays channels-last, else contiguous."""
    nhwc = x.movedim(1, -1)
    if x.dim() > 2 and not x.is_contiguous() and nhwc.is_contiguous():
        return x.new_empty(nhwc.shape).movedim(-1, 1)
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, _eps, silu = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.eps = num_groups, silu, _eps


def _double_differentiable_backward(ctx, grad_y, x, weight, bias):
    """The backward as a differentiable function of (grad_y, x, weight, bias), for
    ``create_graph=True`` (gradient penalties, Hessian-vector products): the fused backward
    op has no derivative of its own, so this differentiates the reference instead."""
    needs = ctx.needs_input_grad
    wanted = [(i, t) for i, t in ((0, x), (2, weight), (3, bias)) if needs[i]]
    with torch.enable_grad():
        y = group_norm_silu_ref(x, ctx.num_groups, weight, bias, ctx.eps, "silu" if ctx.silu else None)
        grads = torch.autograd.grad(y, [t for _, t in wanted], grad_y, create_graph=True, allow_unused=True)
    out = [None] * 6
    for (i, t), g in zip(wanted, grads):
        out[i] = torch.zeros_like(t) if g is None else g
    return tuple(out)


# mean and rstd are auxiliary outputs for the backward; gradients reaching them
# (they are never returned by the public wrapper) are ignored.
def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
        return _double_differentiable_backward(ctx, grad_y, x, weight, bias)
    needs = ctx.needs_input_grad
    affine = bool(needs[2] or needs[3])
    dx, dw, db = torch.ops.sgdm.group_norm_silu_backward(
        grad_y, x, mean, rstd, weight, bias, ctx.num_groups, ctx.silu, affine)
    return (dx if needs[0] else None, None,
            dw.to(weight.dtype) if needs[2] else None,
            db.to(bias.dtype) if needs[3] else None, None, None)


class _GroupNormSiLU(torch.autograd.Function):
    """The op's autograd formula (the one registered on ``sgdm::group_norm_silu`` below),
    applied directly by the public wrapper: torch.library's generic autograd wrapper
    re-reads the op schema on every call, about 17 us of a 70 us forward+backward at the
    small UNet's shapes (4x128x4x4, one CPU thread), 38 times per training step."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, silu):
        out = _extension.call_below_autograd(torch.ops.sgdm.group_norm_silu, x, num_groups, weight, bias,
                                             eps, silu)
        _setup_context(ctx, (x, num_groups, weight, bias, eps, silu), out)
        ctx.mark_non_differentiable(out[1], out[2])
        return out

    backward = staticmethod(_backward)


def _register() -> None:
    @torch.library.register_fake("sgdm::group_norm_silu")
    def _fake_forward(x, num_groups, weight, bias, eps, silu):
        # The C++ glue's checks (they read no data): meta tensors, and a meta weight beside
        # a CPU x (which dispatch sends here), are rejected as the real kernels reject them.
        _check(x, num_groups, weight, bias, eps, "silu" if silu else None)
        stats = x.new_empty((x.shape[0], num_groups), dtype=_acc_dtype(x))
        return _empty_like_layout(x), stats, torch.empty_like(stats)

    @torch.library.register_fake("sgdm::group_norm_silu_backward")
    def _fake_backward(grad_y, x, mean, rstd, weight, bias, num_groups, silu, affine_grads):
        def grad_shape(t):  # the affine's own shape; [C] when absent; [0] when not requested
            if not affine_grads:
                return (0,)
            return tuple(t.shape) if t is not None and t.dim() == 2 else (x.shape[1],)

        return (_empty_like_layout(x), x.new_empty(grad_shape(weight), dtype=_acc_dtype(x)),
                x.new_empty(grad_shape(bias), dtype=_acc_dtype(x)))

    torch.library.register_autograd("sgdm::group_norm_silu", _backward,
                                    setup_context=_setup_context)


if _extension.has_op(_OP):
    _register()
