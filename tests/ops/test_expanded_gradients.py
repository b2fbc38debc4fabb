"""Backwards fed by ``loss = out.sum()`` (or ``.mean()``): the gradient reaching the op is an
expanded tensor with all strides 0, which the kernels (16-byte rows, cp.async on CUDA) cannot
read as it is; the glue must make it dense. On every target."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgdm import ops
from tests.ops.conftest import require_kernels


def _grads(fn, tensors, reduce):
    out = fn(*tensors)
    getattr(out, reduce)().backward()
    return [t.grad for t in tensors]


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_attention_backward_from_a_reduced_loss(target, generator, reduce):
    require_kernels("attention", target)
    dtype = torch.float32 if target == "cpu" else torch.bfloat16
    tensors = [torch.randn(1, 2, 40, 64, generator=generator).to(target, dtype).requires_grad_() for _ in range(3)]
    ref = [t.detach().cpu().double().requires_grad_() for t in tensors]
    got = _grads(ops.attention, tensors, reduce)
    want = _grads(F.scaled_dot_product_attention, ref, reduce)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, g, w in zip("qkv", got, want):
        err = ((g.double().cpu() - w).norm() / w.norm().clamp_min(1e-30)).item()
        assert err < tol, name


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_backward_from_a_reduced_loss(target, generator, channels_last):
    require_kernels("group_norm_silu", target)
    x = torch.randn(2, 8, 6, 5, generator=generator)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    w, b = torch.randn(8, generator=generator), torch.randn(8, generator=generator)
    tensors = [t.to(target).requires_grad_() for t in (x, w, b)]
    ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
    got = _grads(lambda x, w, b: ops.group_norm_silu(x, 4, w, b), tensors, "sum")
    want = _grads(lambda x, w, b: F.silu(F.group_norm(x, 4, w, b, 1e-5)), ref, "sum")
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w_, rtol=1e-4, atol=1e-4)
