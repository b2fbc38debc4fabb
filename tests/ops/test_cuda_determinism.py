"""torch.use_deterministic_algorithms and the CUDA backwards that sum with atomics (attention's dQ in
fp16/bf16, group_norm_silu's per-channel sums): torch's own alert, an error, or a warning with
warn_only=True, as a torch op without a deterministic implementation gives. CUDA only."""
from __future__ import annotations

import pytest
import torch

from sgdm import ops
from tests.ops.conftest import require_kernels

pytestmark = pytest.mark.cuda


@pytest.fixture
def deterministic():
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _attention_backward(dtype):
    q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    ops.attention(q, k, v).float().square().sum().backward()


def _group_norm_backward():
    x = torch.randn(2, 32, 8, 8, device="cuda", requires_grad=True)
    ops.group_norm_silu(x, 8).square().sum().backward()


@pytest.mark.parametrize("run", [lambda: _attention_backward(torch.bfloat16), _group_norm_backward],
                         ids=["attention_bf16", "group_norm_silu"])
def test_atomic_backwards_raise_or_warn_under_deterministic_algorithms(deterministic, run):
    require_kernels("attention", "cuda")
    require_kernels("group_norm_silu", "cuda")
    run()  # no alert outside deterministic mode
    torch.use_deterministic_algorithms(True)
    with pytest.raises(RuntimeError, match="sgdm::.*SGDM_KERNELS=0"):
        run()
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="sgdm::"):
        run()


def test_fp32_attention_backward_is_deterministic_and_allowed(deterministic):
    require_kernels("attention", "cuda")
    torch.use_deterministic_algorithms(True)
    grads = []
    for _ in range(2):
        q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(i),
                               requires_grad=True) for i in range(3))
        ops.attention(q, k, v).square().sum().backward()
        grads.append(q.grad)
    assert torch.equal(grads[0], grads[1])
