"""The op wrappers: empty inputs, and the compiled ops' own checks and numerics."""
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


# The compiled ops' own checks: torch.ops.sgdm.* on real tensors runs the C++ glue directly (the
# Python layer registers only fake kernels and autograd), so what it accepts is decided in C++.

@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_raw_group_norm_silu_rejects_an_eps_that_is_not_positive_and_finite(eps):
    """eps = 0 on a constant group gives rstd = inf and a NaN output; eps < 0 a NaN rstd."""
    require_kernels("group_norm_silu")
    with pytest.raises((RuntimeError, ValueError), match="eps"):
        torch.ops.sgdm.group_norm_silu(torch.ones(2, 4, 3, 3), 2, None, None, eps, True)


def test_raw_guided_ddim_step_refuses_eta_without_noise():
    """The wrapper refuses it (sigma_t > 0 needs noise); the raw op silently returns a step whose
    direction term is shrunk to sqrt(1 - a_prev - sigma^2) with no noise added."""
    require_kernels("guided_ddim_step")
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises((RuntimeError, ValueError), match="noise"):
        torch.ops.sgdm.guided_ddim_step(x, x, None, None, None, None, 0.3, 0.5, 1.0, 1.0, None)
    # per-sample alphas on the CPU: the same check, sample by sample (sample 1 has sigma_t > 0)
    a_t, a_prev = torch.tensor([0.5, 0.3], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    with pytest.raises((RuntimeError, ValueError), match="noise"):
        torch.ops.sgdm.guided_ddim_step(x, x, None, None, a_t, a_prev, 1.0, 1.0, 1.0, 1.0, None)
    # no sample with sigma_t > 0 (a_t == a_prev): nothing to add, so no noise is needed
    torch.ops.sgdm.guided_ddim_step(x, x, None, None, a_prev, a_prev, 1.0, 1.0, 1.0, 1.0, None)


@pytest.mark.parametrize("args, name", [
    ((None, None, 0.3, 0.5, 1.0, -0.5, None), "eta"),

    ((None, None, 0.3, 0.5, float("nan"), 0.0, None), "guidance_scale"),
    ((None, None, 0.3, 0.5, 1.0, 0.0, 0.0), "clip_x0"),
    ((torch.tensor([0.3, 1.5], dtype=torch.float64), None, 1.0, 0.5, 1.0, 0.0, None), "alpha_bar_t"),
    ((None, torch.tensor([0.5, 0.0], dtype=torch.float64), 0.3, 1.0, 1.0, 0.0, None), "alpha_bar_prev"),
])
def test_raw_guided_ddim_step_names_a_bad_number(args, name):
    """What the Python layer refuses by name, the raw op refuses too (it ran with it: a clamp to
    [-0, 0], a negative sigma_t^2, NaN outputs)."""
    require_kernels("guided_ddim_step")
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=name):
        torch.ops.sgdm.guided_ddim_step(x, x, None, None, *args)


@pytest.mark.parametrize("shape,groups", [((4, 32, 32, 32), 8), ((2, 16, 64, 64), 2)],
                         ids=["32x32", "64x64-large-groups"])
def test_group_norm_statistics_with_an_outlying_first_element(target, shape, groups, generator):
    """A 30-sigma corner pixel (the first element of every channel's run): PyTorch's fp32 GroupNorm
    stays within 3e-6 of float64, the CPU kernels were 100-1000x further off (9e-4 at 32 x 32).
    On CUDA every thread shifted its sums by the group's first element, an error of about 1e-4
    at the outlier in a float32 simulation of the reduction; the second shape (32768 elements per
    group) takes the streaming kernel, the first the register-cached one."""
    from sgdm.ops.reference import group_norm_silu_ref

    require_kernels("group_norm_silu", target)
    x = torch.randn(*shape, generator=generator)
    x[:, :, 0, 0] = 30.0
    want = group_norm_silu_ref(x.double(), groups, activation=None)
    got = ops.group_norm_silu(x.to(target), groups, activation=None)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("eta", [1.5, float("nan"), float("inf")])
def test_raw_guided_ddim_step_refuses_eta_above_one(eta):
    """eta > 1 ran: 1 - a_prev - sigma_t^2 turned negative on large steps and was clamped to 0
    (samples too wide); the Python layer, the config and the CLI all keep eta in [0, 1]."""
    require_kernels("guided_ddim_step")
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        torch.ops.sgdm.guided_ddim_step(x, x, None, x, None, None, 0.3, 0.5, 1.0, eta, None)
    torch.ops.sgdm.guided_ddim_step(x, x, None, x, None, None, 0.3, 0.5, 1.0, 1.0, None)  # eta = 1 is fine


# The first steps of the cosine schedule (alpha_bar_t, alpha_bar_prev) and of LDM's linear one.
_NEAR_ONE = [(0.9999125759273678, 0.999958715775178), (0.9997800920720721, 0.9999000000000000)]


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize("alphas", _NEAR_ONE, ids=["cosine-t1", "linear-t1"])
@pytest.mark.parametrize("eta,clip", [(0.0, None), (0.0, 1.0), (1.0, 1.0)])
def test_guided_ddim_step_near_alpha_one_matches_float64(monkeypatch, kernels, alphas, eta, clip, generator):
    """fp32 data, alphas near 1 (the last steps of sampling): the reference (the fallback under
    SGDM_KERNELS=0, and the path of every call that needs gradients) rounded alpha_bar to fp32
    before forming 1 - alpha_bar, losing about log10(1 / (1 - alpha_bar)) digits; with x0 clipping,
    which divides by sqrt(1 - alpha_bar_t), it was 2e-4 off float64 where the kernel is 3e-6."""
    if kernels:
        require_kernels("guided_ddim_step")
    else:
        monkeypatch.setattr(_extension, "kernels_enabled", lambda op, device_type: False)
    from sgdm.ops.reference import guided_ddim_step_ref

    a_t, a_prev = alphas
    x, ec, eu, noise = (torch.randn(4, 4, 8, 8, generator=generator) for _ in range(4))
    extra = {"noise": noise} if eta else {}
    got = ops.guided_ddim_step(x, ec, a_t, a_prev, eu, 2.0, eta=eta, clip_x0=clip, **extra)
    want = guided_ddim_step_ref(x.double(), ec.double(), a_t, a_prev, eu.double(), 2.0, eta=eta, clip_x0=clip,
                                **{k: v.double() for k, v in extra.items()})
    for g, w in zip(got, want):
        assert ((g.double() - w).abs().max() / w.abs().max()).item() < 2e-5


def test_guided_ddim_step_fake_kernel_ignores_noise_at_eta_zero(generator):
    """The C++ op ignores noise when eta = 0 (neither checked nor read, nor part of the layout
    choice); the fake kernel let it decide the output layout: channels-last inputs with a
    contiguous noise gave channels-last outputs eagerly but contiguous fake ones."""
    require_kernels("guided_ddim_step")
    x, ec = (torch.randn(2, 4, 3, 3, generator=generator).to(memory_format=torch.channels_last) for _ in range(2))
    noise = torch.randn(2, 4, 3, 3, generator=generator)
    torch.library.opcheck(torch.ops.sgdm.guided_ddim_step.default,
                          (x, ec, None, noise, None, None, 0.3, 0.5, 1.0, 0.0, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("affine", [None, (8,), (2, 8)], ids=["no-affine", "shared", "per-sample"])
@pytest.mark.parametrize("affine_grads", [True, False])
def test_group_norm_silu_backward_opcheck(dtype, channels_last, affine, affine_grads, generator):
    """opcheck of the backward op itself (its fake kernel: layout of grad_x, shape and dtype of the
    affine gradients, [0] when not requested); the existing opchecks reach it only through autograd."""
    require_kernels("group_norm_silu")
    x = torch.randn(2, 8, 3, 5, generator=generator).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = (None, None) if affine is None else (torch.randn(affine, generator=generator).to(dtype),
                                                torch.randn(affine, generator=generator))
    _, mean, rstd = torch.ops.sgdm.group_norm_silu(x, 4, w, b, 1e-5, True)
    grad_y = torch.randn(2, 8, 3, 5, generator=generator).to(dtype)  # contiguous even for a channels-last x
    torch.library.opcheck(torch.ops.sgdm.group_norm_silu_backward.default,
                          (grad_y, x, mean, rstd, w, b, 4, True, affine_grads))


def test_zero_spatial_size_gives_empty_group_statistics_and_zero_affine_grads(target):
    """[N, C, 0, W]: no elements, so mean 0, rstd 1/sqrt(eps) and zero weight / bias gradients on every
    device. The CUDA kernels launch nothing there; its statistics and sums were left uninitialised."""
    require_kernels("group_norm_silu", target)
    x = torch.randn(2, 4, 0, 3, device=target, requires_grad=True)
    w = torch.ones(4, device=target, requires_grad=True)
    b = torch.zeros(4, device=target, requires_grad=True)
    y, mean, rstd = torch.ops.sgdm.group_norm_silu(x.detach(), 2, w.detach(), b.detach(), 1e-4, True)
    assert y.shape == x.shape
    assert torch.equal(mean.cpu(), torch.zeros(2, 2)) and torch.allclose(rstd.cpu(), torch.full((2, 2), 100.0))
    out = ops.group_norm_silu(x, 2, w, b, eps=1e-4)
    gw, gb = torch.autograd.grad(out.sum(), (w, b))
    assert torch.equal(gw.cpu(), torch.zeros(4)) and torch.equal(gb.cpu(), torch.zeros(4))
