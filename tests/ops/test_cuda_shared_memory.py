"""The CUDA kernels' shared memory at the edges of what a device gives a block: the 48 KiB a
block gets without opting in (static scratch included), more than any device has, and
attention's D = 128 forward, whose fastest tile needs Hopper's 227 KiB (an A100 or RTX GPU
runs a smaller one). CUDA only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgdm import ops
from tests.ops.conftest import require_kernels

pytestmark = pytest.mark.cuda


def _group_norm_ref(x, groups):
    return F.silu(F.group_norm(x.double().cpu(), groups, eps=1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_norm_per_channel_arrays_just_past_48_kib(generator, dtype):
    """3072 channels in one group: the backward's four fp32 arrays (the forward's two fp64 ones)
    take exactly 48 KiB of dynamic shared memory, and the reduction scratch pushes the block
    past the limit that needs no opt-in."""
    require_kernels("group_norm_silu", "cuda")
    x = torch.randn(2, 3072, 2, 2, generator=generator, dtype=dtype).cuda().requires_grad_()
    y = ops.group_norm_silu(x, 1)
    gy = torch.randn(y.shape, generator=generator, dtype=dtype).cuda()
    y.backward(gy)
    xr = x.detach().double().cpu().requires_grad_()
    ref = _group_norm_ref(xr, 1)
    ref.backward(gy.double().cpu())
    torch.testing.assert_close(y.detach().double().cpu(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, rtol=1e-4, atol=1e-4)


def test_group_norm_too_many_channels_per_group_is_named(generator):
    """65536 fp64 channels in one group need 1 MiB of per-channel statistics, more than any GPU
    gives a block: the error names num_groups and the channels per group."""
    require_kernels("group_norm_silu", "cuda")
    x = torch.randn(1, 65536, 1, 1, generator=generator, dtype=torch.float64).cuda()
    with pytest.raises(RuntimeError, match=r"num_groups = 1 leaves 65536 channels per group"):
        ops.group_norm_silu(x, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_head_dim_128_forward_on_this_device(generator, dtype):
    """D = 128 in 16 bits picks its tile by the device's shared memory (two groups on Hopper,
    one elsewhere); either agrees with torch's attention."""
    require_kernels("attention", "cuda")
    q, k, v = (torch.randn(1, 2, 300, 128, generator=generator).to("cuda", dtype) for _ in range(3))
    out = ops.attention(q, k, v)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert (out.double() - want).abs().max().item() < 2e-2
