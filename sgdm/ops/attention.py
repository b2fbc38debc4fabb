"""Fused scaled-dot-product attention, ``softmax(q k^T * scale) v``, non-causal.

Shapes: q ``[B, H, Nq, D]``, k and v ``[B, H, Nk, D]`` (Nq may differ from Nk:
cross-attention to guidance tokens), output ``[B, H, Nq, D]``; scale defaults
to ``D ** -0.5``. Head dims 32, 64 and 128 in fp32, fp16 and bf16 run the
flash-style kernels of ``sgdm._C`` (FlashAttention-2, Dao 2023): blocked
online softmax with fp32 accumulation; the forward saves only the row
log-sum-exp ``lse [B, H, Nq]``, and the backward recomputes
``P = exp(s - lse)`` from it, so no ``Nq x Nk`` tensor exists in either
direction. On the CPU, when B * H is below ``torch.get_num_threads()`` the
backward splits the keys across threads and sums the partial ``dq``, so the last
bits of ``dq`` depend on the thread count (the forward, ``dk`` and ``dv`` do not).
Everything else (other head dims with a one-time warning,
``SGDM_KERNELS=0``, a build without the extension) runs PyTorch's own
``scaled_dot_product_attention``, which picks its fastest backend (flash,
memory-efficient or cuDNN on CUDA, a flash kernel on the CPU): LDM's LSUN-Churches
UNet (192 channels, 8 heads) has head dims 24, 48 and 96. float64 runs
:func:`attention_ref`, the oracle of the tests.

The compiled op ``sgdm::attention(q, k, v, scale) -> (out, lse)`` gets
its fake kernel and autograd here; its backward ``sgdm::attention_backward``
also accepts a gradient for ``lse`` (it enters as ``delta_i -= dL/dlse_i``
since ``d lse_i / d s_ij = P_ij``).

On a compute capability 9.0 GPU (H100, H200) the fp16 / bf16 forward and
backward run on Hopper's warpgroup MMAs (wgmma) when the build has ``9.0a`` in
``TORCH_CUDA_ARCH_LIST`` (:func:`wgmma_built`), and the mma.sync kernels run
elsewhere. ``SGDM_ATTENTION_WGMMA=0`` runs the mma.sync kernels on a 9.0 GPU
too; ``SGDM_ATTENTION_WGMMA=1`` requires the wgmma kernels and is an error
where they cannot run.
"""
from __future__ import annotations

import math
import operator
import warnings

import torch

from sgdm.ops import _extension
from sgdm.ops._checks import check_float_tensor, check_like, check_number

__all__ = ["SUPPORTED_HEAD_DIMS", "attention", "attention_ref", "wgmma_built"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OP = "attention"
_NAME = "attention"


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain-PyTorch ``softmax(q k^T * scale) v`` over ``[B, H, N, D]``, fp32 accumulation.

    The fallback of :func:`attention` and the oracle of its tests (float64 in,
    float64 arithmetic).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    return torch.matmul(s.softmax(-1), v.to(acc)).to(q.dtype)


def _check_inputs(q, k, v, scale) -> None:
    """Raises TypeError / ValueError naming the argument that is wrong."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(t, name, _NAME, min_dim=4, shape_hint="[B, H, N, D]")
        if t.dim() != 4:
            raise ValueError(f"{_NAME}: {name} must be [B, H, N, D], got shape {tuple(t.shape)}")
        # B, H or Nq = 0 leaves nothing to attend (an empty output); no keys or D = 0 is an error
        if t.shape[3] == 0 or (name != "q" and t.shape[2] == 0):
            raise ValueError(f"{_NAME}: {name} is empty (shape {tuple(t.shape)})")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{_NAME}: {name} is on {t.device} but q is on {q.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{_NAME}: {name} has dtype {t.dtype} but q has {q.dtype}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"{_NAME}: k has shape {tuple(k.shape)}, which does not match q "
                         f"{tuple(q.shape)} in B, H or D")
    check_like(v, "v", k, "k", _NAME)
    if scale is not None:
        check_number(scale, "scale", _NAME)


_warned_head_dims: set[int] = set()


@_extension.constant_for_compile
def _kernel_ok(device_type: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the compiled kernel handles this case; a constant for torch.compile."""
    if dtype not in _KERNEL_DTYPES or not _extension.kernels_enabled(_OP, device_type):
        return False
    if head_dim not in SUPPORTED_HEAD_DIMS:
        if head_dim not in _warned_head_dims:
            _warned_head_dims.add(head_dim)
            warnings.warn(f"attention: head dim {head_dim} has no fused kernel (supported: "
                          f"{SUPPORTED_HEAD_DIMS}); using torch's scaled_dot_product_attention", RuntimeWarning,
                          stacklevel=3)
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v``: q ``[B, H, Nq, D]``, k, v ``[B, H, Nk, D]`` -> ``[B, H, Nq, D]``.

    Differentiable in q, k and v. Inputs may be non-contiguous (e.g. views of
    one packed qkv tensor) as long as they share dtype and device. B, H or Nq = 0
    gives an empty output (an empty batch); Nk = 0 or D = 0 is an error.
    """
    # The usual call goes straight to the op (its C++ glue and fake kernel check q, k, v;
    # a failure there is diagnosed again by _check_inputs, so the error names the
    # argument), through _Attention only when a gradient is needed: at the UNet's 16-token
    # attention the Python checks and torch.library's autograd wrapper were a third of a call.
    if (isinstance(q, torch.Tensor) and q.dim() == 4 and (scale is None or (
            type(scale) is float and -math.inf < scale < math.inf))
            and not torch.compiler.is_compiling() and not _over_cuda_grid(q)
            and _kernel_ok("cpu" if q.is_cpu else q.device.type, q.dtype, q.shape[-1])):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        try:
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                return _Attention.apply(q, k, v, scale)
            return _extension.call_below_autograd(torch.ops.sgdm.attention, q, k, v, scale)[0]
        except Exception:
            _check_inputs(q, k, v, scale)  # raises the error that names the argument
            if q.numel() == 0:  # an empty batch, which the compiled op refuses
                return _fallback(q, k, v, scale)
            raise
    _check_inputs(q, k, v, scale)
    # operator.index, not int: under torch.compile(dynamic=True) it specialises a symbolic head
    # dim into the constant that _kernel_ok (assume_constant_result) needs
    head_dim = operator.index(q.shape[-1])
    scale = float(head_dim ** -0.5 if scale is None else scale)
    if q.numel() and _kernel_ok(q.device.type, q.dtype, head_dim):
        if not _over_cuda_grid(q):
            return _Attention.apply(q, k, v, scale)
        if q.shape[1] <= _CUDA_MAX_BH:
            return _in_batch_chunks(q, k, v, scale)
    return _fallback(q, k, v, scale)


# the CUDA kernels put B * H on the launch grid's y dimension, which holds at most 65535 blocks
_CUDA_MAX_BH = 65535


def _over_cuda_grid(q: torch.Tensor) -> bool:
    """B * H beyond what the CUDA kernels launch (e.g. B > 8191 at 8 heads): :func:`attention` runs it
    in chunks of the batch. Checked before the op is called, whose own check raises an error (on the
    GPU machine's statically linked libstdc++, before setup.py kept it private, that error crashed)."""
    return q.is_cuda and q.shape[0] * q.shape[1] > _CUDA_MAX_BH


def _in_batch_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention over B * H > 65535 on CUDA: the kernels on chunks of the batch that fit the grid.
    (SDPA's cuDNN backward failed at B * H = 65536 on an H200: 'mha_graph.execute ... is_good()'.)"""
    step = _CUDA_MAX_BH // q.shape[1]
    return torch.cat([_Attention.apply(q[i:i + step], k[i:i + step], v[i:i + step], scale)
                      for i in range(0, q.shape[0], step)])


def _fallback(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention without sgdm's kernel: PyTorch's ``scaled_dot_product_attention`` (its fused backends
    keep memory O(N), where :func:`attention_ref` holds the Nq x Nk scores), or the float64 oracle."""
    if q.dtype == torch.float64:
        return attention_ref(q, k, v, scale)
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _double_differentiable_backward(ctx, grad_out, grad_lse, q, k, v):
    """The backward as a differentiable function of its inputs, for ``create_graph=True``
    (gradient penalties, Hessian-vector products): the fused backward op has no derivative
    of its own, so this differentiates the reference, ``out`` and ``lse`` alike."""
    needs = ctx.needs_input_grad[:3]
    wanted = [t for t, need in zip((q, k, v), needs) if need]
    with torch.enable_grad():
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * ctx.scale
        outputs, grads_in = [], []
        if grad_out is not None:
            outputs.append(torch.matmul(s.softmax(-1), v.to(acc)).to(q.dtype))
            grads_in.append(grad_out)
        if grad_lse is not None:
            outputs.append(s.logsumexp(-1).float())
            grads_in.append(grad_lse)
        grads = torch.autograd.grad(outputs, wanted, grads_in, create_graph=True, allow_unused=True)
    grads = iter(grads)
    result = [None if not need else next(grads) for need in needs]
    result = [torch.zeros_like(t) if need and g is None else g for t, need, g in zip((q, k, v), needs, result)]
    return (*result, None)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
        return _double_differentiable_backward(ctx, grad_out, grad_lse, q, k, v)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.sgdm.attention_backward(grad_out, q, k, v, out, lse, grad_lse, ctx.scale)
    return dq, dk, dv, None


class _Attention(torch.autograd.Function):
    """The op's autograd formula (also registered on ``sgdm::attention`` below), applied
    directly by the public wrapper, which returns ``out`` alone: the generic wrapper of
    ``torch.library`` re-reads the op schema on every call."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = _extension.call_below_autograd(torch.ops.sgdm.attention, q, k, v, scale)
        _setup_context(ctx, (q, k, v, scale), (out, lse))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out, None)


def backend(device_type: str = "cpu") -> str:
    """Which implementation runs on ``device_type`` for a supported head dim."""
    return _extension.backend(_OP, device_type)


def wgmma_built() -> bool:
    """Whether ``sgdm._C`` holds the Hopper wgmma kernels (a CUDA build with 9.0a in
    ``TORCH_CUDA_ARCH_LIST``), which a compute capability 9.0 GPU runs unless
    ``SGDM_ATTENTION_WGMMA=0``."""
    return _extension.has_op("_attention_wgmma_built") and bool(torch.ops.sgdm._attention_wgmma_built())


def _register() -> None:
    """Fake kernels (shapes for torch.compile / meta) and autograd of the compiled op."""

    @torch.library.register_fake("sgdm::attention")
    def _fwd_fake(q, k, v, scale):
        _check_inputs(q, k, v, scale)  # the compiled op's checks (no data read)
        if q.numel() == 0:  # the wrapper sends B, H or Nq = 0 to the fallback instead
            raise ValueError(f"{_NAME}: q is empty (shape {tuple(q.shape)})")
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("sgdm::attention_backward")
    def _bwd_fake(grad_out, q, k, v, out, lse, grad_lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    torch.library.register_autograd("sgdm::attention", _backward, setup_context=_setup_context)


if _extension.has_op(_OP):
    _register()
