"""The CUDA ops on a GPU other than the current one: each launcher sets its tensors' device
(a kernel launched on the current device would read another GPU's memory). Needs two GPUs."""
from __future__ import annotations

import pytest
import torch

from sgdm import ops
from tests.ops.conftest import require_kernels

pytestmark = pytest.mark.cuda


def _run(op, tensors, device):
    """op's outputs and its inputs' gradients, with the inputs moved to ``device``."""
    moved = [t.detach().to(device).requires_grad_(t.requires_grad) for t in tensors]
    if op == "attention":
        outs = [ops.attention(*moved)]
    elif op == "group_norm_silu":
        outs = [ops.group_norm_silu(moved[0], 4, moved[1], moved[2])]
    else:
        with torch.no_grad():
            outs = list(ops.guided_ddim_step(moved[0], moved[1], 0.3, 0.6, eps_uncond=moved[2],
                                             guidance_scale=2.0))
    if outs[0].requires_grad:
        outs[0].backward(torch.ones_like(outs[0]))
    return [t.cpu() for t in outs] + [t.grad.cpu() for t in moved if t.grad is not None]


@pytest.mark.parametrize("op", ["attention", "group_norm_silu", "guided_ddim_step"])
def test_op_on_a_gpu_other_than_the_current_one(generator, op):
    require_kernels(op, "cuda")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    if op == "attention":
        tensors = [torch.randn(2, 2, 70, 64, generator=generator).half().requires_grad_() for _ in range(3)]
    elif op == "group_norm_silu":
        tensors = [torch.randn(2, 8, 5, 6, generator=generator).requires_grad_(),
                   torch.randn(8, generator=generator).requires_grad_(), torch.randn(8, generator=generator)]
    else:
        tensors = [torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3)]
    torch.cuda.set_device(0)
    want = _run(op, tensors, "cuda:0")
    got = _run(op, tensors, "cuda:1")
    assert torch.cuda.current_device() == 0
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)  # the backwards' atomics add in any order
