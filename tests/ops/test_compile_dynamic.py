"""The op wrappers under ``torch.compile(dynamic=True)``: symbolic sizes and symbolic floats.

With ``dynamic=True`` dynamo traces the wrappers' float defaults (``eps=1e-5``, ``guidance_scale``,
``eta``) as SymFloats and the sizes as SymInts. ``math.isfinite`` of a SymFloat and
``assume_constant_result`` of a SymInt head dim both stopped the trace: every op failed under
``fullgraph=True`` (and broke the graph without it).
"""
from __future__ import annotations

import pytest
import torch

from sgdm import ops
from tests.ops.conftest import require_kernels


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_dynamic_shapes(channels_last, generator):
    require_kernels("group_norm_silu")

    def fn(x, w, b):
        return ops.group_norm_silu(x, 4, w, b)

    compiled = _compiled(fn)
    for shape in ((2, 8, 3, 5), (3, 8, 4, 4)):
        x = torch.randn(shape, generator=generator)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        w = torch.randn(8, generator=generator, requires_grad=True)
        b = torch.randn(shape[0], 8, generator=generator, requires_grad=True)
        got, want = compiled(x, w, b), fn(x, w, b)
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want)
        for g, e in zip(torch.autograd.grad(got.sum(), (x, w, b)), torch.autograd.grad(want.sum(), (x, w, b))):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("per_sample", [False, True])
def test_guided_ddim_step_dynamic_shapes(per_sample, generator):
    require_kernels("guided_ddim_step")

    def fn(x, ec, eu, a_t):
        return ops.guided_ddim_step(x, ec, a_t, 0.9, eu, 2.0)

    compiled = _compiled(fn)
    for shape in ((2, 4, 3, 3), (3, 4, 5, 5)):
        x, ec, eu = (torch.randn(shape, generator=generator) for _ in range(3))
        a_t = torch.rand(shape[0], generator=generator) * 0.5 + 0.1 if per_sample else 0.3
        for g, e in zip(compiled(x, ec, eu, a_t), fn(x, ec, eu, a_t)):
            torch.testing.assert_close(g, e)


def test_attention_dynamic_shapes(generator):
    require_kernels("attention")

    def fn(q, k, v):
        return ops.attention(q, k, v)

    compiled = _compiled(fn)
    for b, h, nq, nk in ((2, 2, 5, 7), (1, 3, 9, 4)):
        q = torch.randn(b, h, nq, 32, generator=generator, requires_grad=True)
        k, v = (torch.randn(b, h, nk, 32, generator=generator, requires_grad=True) for _ in range(2))
        got, want = compiled(q, k, v), fn(q, k, v)
        torch.testing.assert_close(got, want)
        for g, e in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
            torch.testing.assert_close(g, e)
