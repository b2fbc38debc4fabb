"""Audit of the op wrappers: empty inputs, and the compiled ops' own checks and numerics."""
from __future__ import annotations

import pytest
import torch

from sgdm import ops
from sgdm.ops import _extension
from tests.ops.conftest import require_kernels


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,h,nq", [(0, 2, 5), (2, 0, 5), (2, 2, 0)], ids=["B=0", "H=0", "Nq=0"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_attention_with_nothing_to_attend_is_empty(monkeypatch, kernels, dtype, b, h, nq, grad, generator):
    """B, H or Nq = 0 gives an empty output and zero gradients, as torch's SDPA and the other ops
    (GroupNorm+SiLU and the DDIM step take N = 0) do; it raised "q is empty", so the UNet's
    AttentionBlock failed on an empty batch that its GroupNorms and convolutions accept."""
    if kernels:
        require_kernels("attention")
    else:
        monkeypatch.setattr(_extension, "kernels_enabled", lambda op, device_type: False)
    q = torch.randn(b, h, nq, 32, generator=generator, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(b, h, 7, 32, generator=generator, dtype=dtype, requires_grad=grad) for _ in range(2))
    out = ops.attention(q, k, v)
    assert out.shape == (b, h, nq, 32) and out.dtype == dtype
    if grad:
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        for g, t in zip(grads, (q, k, v)):
            assert g.shape == t.shape and not g.any()


def test_attention_block_takes_an_empty_batch():
    from sgdm.models.unet import AttentionBlock

    block = AttentionBlock(64, 2, 8)  # head dim 32: the fused kernel where it is built
    assert block(torch.randn(0, 64, 4, 4)).shape == (0, 64, 4, 4)


@pytest.mark.parametrize("q_shape,kv_shape,match", [
    ((1, 2, 3, 32), (1, 2, 0, 32), "k is empty"),   # no keys: the softmax has nothing to normalise
    ((1, 2, 3, 0), (1, 2, 3, 0), "q is empty"),     # D = 0
])
@pytest.mark.filterwarnings("ignore:attention. head dim 0")
def test_attention_without_keys_is_still_an_error(q_shape, kv_shape, match):
    with pytest.raises(ValueError, match=match):
        ops.attention(torch.zeros(q_shape), torch.zeros(kv_shape), torch.zeros(kv_shape))


def test_attention_fake_kernel_still_rejects_an_empty_q():
    """The compiled op refuses empty tensors, so its fake kernel does too."""
    require_kernels("attention")
    q = torch.zeros(0, 2, 3, 32, device="meta")
    with pytest.raises(ValueError, match="q is empty"):
        torch.ops.sgdm.attention(q, q, q, 1.0)
