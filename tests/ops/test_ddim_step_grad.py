"""The op wrappers: guided_ddim_step, which has no autograd formula, when gradients are wanted."""
from __future__ import annotations

import pytest
import torch

from sgdm import ops
from sgdm.ops.reference import guided_ddim_step_ref
from tests.ops.conftest import require_kernels


def _leaves(generator, n=4, shape=(2, 3, 4, 4)):
    return [torch.randn(shape, generator=generator, dtype=torch.float64).float().requires_grad_() for _ in range(n)]


def _grads_of(fn, tensors, weights):
    outs = fn(*tensors)
    grads = torch.autograd.grad([(o * w).sum() for o, w in zip(outs, weights)], tensors, allow_unused=True)
    return outs, grads


@pytest.mark.parametrize("kwargs", [{}, {"eta": 0.5}, {"clip_x0": 0.8}, {"per_sample": True}])
def test_guided_ddim_step_gives_the_reference_gradients(kwargs, generator):
    """A call that needs gradients (grad mode on, an input that requires them) gets the reference's
    gradients; the kernel has no autograd formula, and its outputs came back marked as requiring grad
    while backward left every input's .grad None (only PyTorch's deprecation warning said so)."""
    require_kernels("guided_ddim_step")
    kwargs = dict(kwargs)
    x, ec, eu, noise = _leaves(generator)
    if kwargs.pop("per_sample", False):
        a_t = torch.tensor([0.3, 0.6], requires_grad=True)
        a_p = torch.tensor([0.5, 0.9], requires_grad=True)
    else:
        a_t, a_p = 0.3, 0.5
    extra = {"noise": noise} if kwargs.get("eta") else {}
    weights = [torch.randn(x.shape, generator=generator) for _ in range(2)]
    leaves = [x, ec, eu] + [a for a in (a_t, a_p) if isinstance(a, torch.Tensor)] + list(extra.values())

    def call(impl):
        def fn(*_):
            return impl(x, ec, a_t, a_p, eu, 2.0, **kwargs, **extra)
        return fn

    got, got_grads = _grads_of(call(ops.guided_ddim_step), leaves, weights)
    want, want_grads = _grads_of(call(guided_ddim_step_ref), leaves, weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g is not None, f"no gradient for input {i}"
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


def test_guided_ddim_step_without_grad_mode_still_runs_the_kernel(generator, monkeypatch):
    """Sampling (no_grad, or inputs that need no gradient) keeps the fused kernel."""
    require_kernels("guided_ddim_step")
    x, ec, eu, _ = _leaves(generator)
    calls = []
    op = torch.ops.sgdm.guided_ddim_step

    class Counting:
        def __call__(self, *args):
            calls.append(1)
            return op(*args)

    monkeypatch.setattr(torch.ops.sgdm, "guided_ddim_step", Counting())
    with torch.no_grad():
        ops.guided_ddim_step(x, ec, 0.3, 0.5, eu, 2.0)
        ops.guided_ddim_step(x, ec, 0.3, 0.5, eu, 2.0, clip_x0=1.0)
    ops.guided_ddim_step(x.detach(), ec.detach(), 0.3, 0.5, eu.detach(), 2.0)
    assert len(calls) == 3
