"""ResBlock's scale-shift norm, folded into one per-sample-affine sgdm.ops.group_norm_silu call,
against the unfolded formulation silu(GroupNorm(h) * (1 + scale) + shift) (ADM)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgdm.ops import _extension
from sgdm.models.unet import ResBlock

from tests.models.helpers import randomize_


def unfolded_forward(block: ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The block as ADM writes it, with torch's own GroupNorm and SiLU."""
    def gn(norm, h):
        return F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)

    h = block.in_conv(block._resample(F.silu(gn(block.in_norm, x))))
    x = block._resample(x)
    scale, shift = block.emb_proj(emb)[..., None, None].chunk(2, dim=1)
    h = F.silu(gn(block.out_norm, h) * (1 + scale) + shift)
    return block.skip(x) + block.out_conv(block.dropout(h))


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("resample", ["none", "up", "down"])
def test_folded_scale_shift_matches_unfolded(monkeypatch, kernels, resample, generator):
    if not kernels:
        monkeypatch.setattr(_extension, "kernels_enabled", lambda op, device_type: False)
    elif not _extension.kernels_enabled("group_norm_silu", "cpu"):
        pytest.skip("sgdm._C has no CPU group_norm_silu kernel")
    block = ResBlock(16, 24, 32, dropout=0.0, groups=8, scale_shift=True, up=resample == "up",
                     down=resample == "down")
    randomize_(block, generator, std=0.3)  # non-trivial norm affine, scale and shift
    x = torch.randn(3, 16, 6, 6, generator=generator).requires_grad_()
    emb = torch.randn(3, 24, generator=generator).requires_grad_()
    y = block(x, emb)
    want = unfolded_forward(block, x, emb)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    gy = torch.randn(y.shape, generator=generator)
    inputs = [x, emb] + list(block.parameters())
    got = torch.autograd.grad(y, inputs, gy)
    exp = torch.autograd.grad(want, inputs, gy)
    names = ["x", "emb"] + [n for n, _ in block.named_parameters()]
    for name, g, e in zip(names, got, exp):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_folded_scale_shift_keeps_parameter_names():
    """Checkpoints written before the fold load unchanged: same keys, same shapes."""
    block = ResBlock(16, 24, 32, dropout=0.0, groups=8, scale_shift=True)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == {
        "in_norm.weight": (16,), "in_norm.bias": (16,), "in_conv.weight": (32, 16, 3, 3), "in_conv.bias": (32,),
        "emb_proj.1.weight": (64, 24), "emb_proj.1.bias": (64,), "out_norm.weight": (32,),
        "out_norm.bias": (32,), "out_conv.weight": (32, 32, 3, 3), "out_conv.bias": (32,),
        "skip.weight": (32, 16, 1, 1), "skip.bias": (32,)}
