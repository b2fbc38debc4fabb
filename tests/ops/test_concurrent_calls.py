"""The CPU kernels called from two Python threads at once (a data-loader thread and the
main thread, or two pipelines in one server): ops release the GIL, so the calls overlap,
and each must give exactly what it gives alone (no shared scratch, no shared state)."""
from __future__ import annotations

import threading

import torch

from sgdm import ops
from tests.ops.conftest import require_kernels


def _calls(generator):
    """Each op forward and backward on small inputs; returns a function giving all results."""
    x = torch.randn(2, 16, 9, 9, generator=generator)
    w, b = torch.randn(16, generator=generator), torch.randn(16, generator=generator)
    q, k, v = (torch.randn(1, 2, 70, 32, generator=generator) for _ in range(3))
    eps, eps_u = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    x_t = torch.randn(2, 4, 8, 8, generator=generator)

    def run():
        xs, qs = x.clone().requires_grad_(), q.clone().requires_grad_()
        y = ops.group_norm_silu(xs, 4, w, b)
        out = ops.attention(qs, k, v)
        (y.square().sum() + out.square().sum()).backward()
        x_prev, x0 = ops.guided_ddim_step(x_t, eps, 0.4, 0.6, eps_uncond=eps_u, guidance_scale=3.0, clip_x0=1.0)
        return [y.detach(), xs.grad, out.detach(), qs.grad, x_prev, x0]

    return run


def test_two_python_threads_get_the_single_thread_results(generator):
    for op in ("group_norm_silu", "attention", "guided_ddim_step"):
        require_kernels(op)
    run = _calls(generator)
    expected = run()
    mismatches, errors = [], []

    def worker():
        try:
            for _ in range(10):
                for i, (got, want) in enumerate(zip(run(), expected)):
                    if not torch.equal(got, want):
                        mismatches.append(i)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not mismatches, f"results that differ from a lone call (indices): {sorted(set(mismatches))}"
