"""sgdm.ops.guided_ddim_step against float64 references and closed forms, on every CPU
ISA path (and CUDA)."""
from __future__ import annotations

import math

import pytest
import torch

from sgdm import ops
from sgdm.ops import _extension
from sgdm.ops.reference import guided_ddim_step_ref
from tests.ops.conftest import require_kernels

OP = "guided_ddim_step"
SHAPES = [(3, 4, 5, 7), (1, 3, 1, 1), (2, 37), (4, 2, 3, 3, 3), (2, 4, 64, 65)]


def _tensors(shape, generator, n=4, dtype=torch.float32, device="cpu"):
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).to(device)
            for _ in range(n)]


def _ref64(x, ec, a_t, a_p, eu=None, w=1.0, eta=0.0, noise=None, clip=None):
    d = (lambda t: None if t is None else t.double().cpu())
    a = (lambda v: d(v) if isinstance(v, torch.Tensor) else v)
    return guided_ddim_step_ref(d(x), d(ec), a(a_t), a(a_p), d(eu), w, eta, d(noise), clip)


def _close(got, want, dtype=torch.float32):
    tol = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w,eta,clip,uncond", [
    (2.5, 0.0, None, True), (1.0, 0.0, None, False), (0.0, 0.5, None, True),
    (3.0, 1.0, 1.0, True), (1.5, 0.0, 0.5, False)])
def test_matches_float64_reference(target, shape, w, eta, clip, uncond, generator):
    require_kernels(OP, target)
    x, ec, eu, noise = _tensors(shape, generator, device=target)
    eu = eu if uncond else None
    got = ops.guided_ddim_step(x, ec, 0.35, 0.6, eps_uncond=eu, guidance_scale=w, eta=eta,
                               noise=noise, clip_x0=clip)
    _close(got, _ref64(x, ec, 0.35, 0.6, eu, w, eta, noise if eta else None, clip))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(target, dtype, generator):
    require_kernels(OP, target)
    x, ec, eu, noise = _tensors((2, 4, 9, 9), generator, dtype=dtype, device=target)
    got = ops.guided_ddim_step(x, ec, 0.2, 0.5, eps_uncond=eu, guidance_scale=2.0, eta=0.3,
                               noise=noise)
    _close(got, _ref64(x, ec, 0.2, 0.5, eu, 2.0, 0.3, noise), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 15, 16, 17, 40, 1000])
def test_low_precision_rounds_like_torch(target, dtype, numel, generator):
    """fp16/bf16 in and out of registers: bit-exact against torch's own conversions.

    With alpha_bar_t = 1 and eps_cond = 0 the step is x0 = x and x_prev = 0.75 * x
    (sqrt(0.5625)), exact in float32 but not in the low-precision type, so the output
    must be torch's round-to-nearest-even of 0.75 * x; ties are frequent (two extra bits).
    Odd sizes cover the partial vectors at the end, specials cover inf and NaN."""
    require_kernels(OP, target)
    x = torch.randn(2, numel, generator=generator).to(dtype)
    x.view(-1)[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1 + 2 ** -7])[:x.numel()]
    x, zero = x.to(target), torch.zeros_like(x, device=target)
    x_prev, x0 = ops.guided_ddim_step(x, zero, 1.0, 0.5625)
    for got, want in ((x0, x), (x_prev, (x.float() * 0.75).to(dtype))):
        nan = want.isnan()  # any NaN encoding (torch itself writes 0x7fc0 or 0xffff)
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_per_sample_alphas(target, generator):
    require_kernels(OP, target)
    x, ec, eu, noise = _tensors((4, 3, 6, 5), generator, device=target)
    a_t = torch.tensor([0.05, 0.3, 0.9, 1.0], dtype=torch.float64)
    a_p = torch.tensor([0.1, 0.5, 1.0, 1.0])  # float32 on the CPU: any float dtype and device
    got = ops.guided_ddim_step(x, ec, a_t.to(target), a_p, eps_uncond=eu, guidance_scale=1.7,
                               eta=0.8, noise=noise, clip_x0=2.0)
    _close(got, _ref64(x, ec, a_t, a_p, eu, 1.7, 0.8, noise, 2.0))
    one = ops.guided_ddim_step(x[2:3], ec[2:3], 0.9, 1.0, eps_uncond=eu[2:3], guidance_scale=1.7,
                               eta=0.8, noise=noise[2:3], clip_x0=2.0)
    torch.testing.assert_close(got[0][2:3], one[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
def test_vector_and_unaligned_storage(target, dtype, offset, generator):
    """Per-sample slices that are whole 16-byte vectors (CUDA's vector path), and the
    same data starting one element into its storage (the element-wise path)."""
    require_kernels(OP, target)
    shape = (3, 4, 8, 8)
    ts = []
    for t in _tensors(shape, generator, dtype=dtype, device=target):
        buf = torch.empty(t.numel() + 1, dtype=dtype, device=target)
        view = buf[offset:offset + t.numel()].view(shape)
        view.copy_(t)
        ts.append(view)
    x, ec, eu, noise = ts
    assert (x.data_ptr() % 16 == 0) == (offset == 0)
    got = ops.guided_ddim_step(x, ec, 0.3, 0.55, eps_uncond=eu, guidance_scale=2.5, eta=0.6,
                               noise=noise, clip_x0=1.5)
    _close(got, _ref64(x, ec, 0.3, 0.55, eu, 2.5, 0.6, noise, 1.5), dtype)


@pytest.mark.parametrize("per_sample_alphas", [False, True], ids=["scalar", "per-sample"])
def test_split_across_threads(target, per_sample_alphas, generator):
    """Large enough to be split between threads: scalar alphas run the batch as one flat
    range, per-sample alphas in per-sample chunks; both must match the reference."""
    require_kernels(OP, target)
    shape = (5, 3, 61, 67)  # 61305 elements per sample, not a multiple of the chunk
    x, ec, eu, noise = _tensors(shape, generator, device=target)
    a_t = torch.linspace(0.1, 0.8, 5, dtype=torch.float64) if per_sample_alphas else 0.3
    a_p = torch.linspace(0.2, 0.9, 5, dtype=torch.float64) if per_sample_alphas else 0.55
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = ops.guided_ddim_step(x, ec, a_t, a_p, eps_uncond=eu, guidance_scale=1.5, eta=0.4,
                                   noise=noise)
    finally:
        torch.set_num_threads(threads)
    _close(got, _ref64(x, ec, a_t, a_p, eu, 1.5, 0.4, noise))


@pytest.mark.parametrize("layout", ["channels_last", "strided", "mixed"])
def test_layouts(target, layout, generator):
    require_kernels(OP, target)
    x, ec, eu, noise = _tensors((2, 6, 5, 7), generator, device=target)
    if layout == "channels_last":
        x, ec, eu, noise = (t.to(memory_format=torch.channels_last) for t in (x, ec, eu, noise))
    elif layout == "strided":
        x, ec = (torch.cat([t, t], dim=-1)[..., ::2] for t in (x, ec))
    else:
        eu = eu.to(memory_format=torch.channels_last)
    got = ops.guided_ddim_step(x, ec, 0.4, 0.7, eps_uncond=eu, guidance_scale=2.0, eta=0.5,
                               noise=noise)
    _close(got, _ref64(x, ec, 0.4, 0.7, eu, 2.0, 0.5, noise))
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_closed_forms(monkeypatch, impl, generator):
    """Independent of the reference: exact x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps is inverted
    exactly; guidance scales 0 and 1 select eps_uncond and eps_cond (Eq. 4); eta = 1 gives the
    DDPM posterior standard deviation."""
    if impl == "kernel":
        require_kernels(OP)
    else:
        monkeypatch.setattr(_extension, "kernels_enabled", lambda op, device_type: False)
    x0, eps, other, noise = _tensors((2, 3, 4, 4), generator, dtype=torch.float64)
    a_t, a_p = 0.3, 0.8
    x = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    x_prev, x0_pred = ops.guided_ddim_step(x, eps, a_t, a_p)
    torch.testing.assert_close(x0_pred, x0)
    torch.testing.assert_close(x_prev, math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps)
    for w, chosen in ((1.0, eps), (0.0, other)):
        got = ops.guided_ddim_step(x, eps, a_t, a_p, eps_uncond=other, guidance_scale=w)
        torch.testing.assert_close(got, ops.guided_ddim_step(x, chosen, a_t, a_p))
    sigma = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    with_noise = ops.guided_ddim_step(x, eps, a_t, a_p, eta=1.0, noise=noise)[0]
    without = ops.guided_ddim_step(x, eps, a_t, a_p, eta=1.0, noise=torch.zeros_like(noise))[0]
    torch.testing.assert_close(with_noise - without, sigma * noise)
    torch.testing.assert_close(without, math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma**2) * eps)
    clipped = ops.guided_ddim_step(x, eps, a_t, a_p, clip_x0=0.5)
    torch.testing.assert_close(clipped[1], x0.clamp(-0.5, 0.5))


def test_final_step_needs_no_noise(target, generator):
    """a_prev = 1 (the last step) has sigma_t = 0, so eta > 0 without noise is fine."""
    require_kernels(OP, target)
    x, ec, _, _ = _tensors((2, 3, 4, 4), generator, device=target)
    x_prev, x0 = ops.guided_ddim_step(x, ec, 0.9, 1.0, eta=1.0)
    torch.testing.assert_close(x_prev, x0)


def test_opcheck(generator):
    require_kernels(OP)
    x, ec, eu, noise = _tensors((2, 3, 4, 5), generator)
    a = torch.tensor([0.3, 0.6], dtype=torch.float64)
    for args in ((x, ec, eu, noise, a, None, 1.0, 0.9, 2.0, 0.5, 1.0),
                 (x, ec, None, None, None, None, 0.3, 0.9, 1.0, 0.0, None),
                 (x.to(memory_format=torch.channels_last), ec, eu, None, None, a, 0.3, 1.0, 3.0,
                  0.0, None)):
        torch.library.opcheck(torch.ops.sgdm.guided_ddim_step.default, args)


def test_torch_compile_fullgraph(generator):
    require_kernels(OP)
    x, ec, eu, noise = _tensors((2, 3, 4, 5), generator)

    def fn(x, ec, eu, noise):
        x_prev, x0 = ops.guided_ddim_step(x, ec, 0.3, 0.7, eps_uncond=eu, guidance_scale=2.0,
                                          eta=0.5, noise=noise)
        return x_prev + 1, x0

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, ec, eu, noise)
    torch.testing.assert_close(got, fn(x, ec, eu, noise))


def test_torch_compile_fullgraph_deterministic_step(generator):
    """The usual sampling call (float alphas, eta = 0), which eager runs straight to the op."""
    require_kernels(OP)
    x, ec, eu, _ = _tensors((2, 3, 4, 5), generator)

    def fn(x, ec, eu):
        x_prev, x0 = ops.guided_ddim_step(x, ec, 0.3, 0.7, eps_uncond=eu, guidance_scale=2)
        return x_prev * 2, x0

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, ec, eu)
    torch.testing.assert_close(got, fn(x, ec, eu))


def test_torch_compile_keeps_the_checks_that_read_data(generator):
    """Traced code cannot read the per-sample alphas, so their range and the need for noise
    are asserted when the graph runs: the same errors as eager, not a silent NaN or a step
    without its noise term."""
    require_kernels(OP)
    x, ec, _, _ = _tensors((2, 3, 4, 4), generator)
    scalar = torch.compile(lambda x, ec: ops.guided_ddim_step(x, ec, 0.3, 0.6, eta=1.0),
                           fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception):  # raised while tracing (dynamo wraps the ValueError)
        scalar(x, ec)
    per_sample = torch.compile(lambda x, ec, at, ap: ops.guided_ddim_step(x, ec, at, ap, eta=1.0),
                               fullgraph=True, backend="aot_eager")
    a_prev = torch.tensor([0.6, 0.7])
    with pytest.raises(RuntimeError, match="noise is required when eta > 0"):
        per_sample(x, ec, torch.tensor([0.3, 0.4]), a_prev)
    for bad in ([0.0, 0.4], [1.5, 0.4]):
        with pytest.raises(RuntimeError, match="every alpha_bar_t must lie in \\(0, 1\\]"):
            per_sample(x, ec, torch.tensor(bad), a_prev)
    # sigma_t = 0 for every sample (a_t = a_prev): no noise needed, compiled or not
    torch.testing.assert_close(per_sample(x, ec, a_prev, a_prev),
                               ops.guided_ddim_step(x, ec, a_prev, a_prev, eta=1.0))


def test_direct_and_checked_calls_agree(generator):
    """Float alphas with eta = 0 go straight to the op; per-sample alphas go through every
    Python check first (and per-sample coefficients). Both give the same step."""
    require_kernels(OP)
    x, ec, eu, _ = _tensors((3, 4, 5, 5), generator)
    direct = ops.guided_ddim_step(x, ec, 0.25, 0.6, eps_uncond=eu, guidance_scale=2.5)
    checked = ops.guided_ddim_step(x, ec, torch.full((3,), 0.25), torch.full((3,), 0.6),
                                   eps_uncond=eu, guidance_scale=2.5)
    torch.testing.assert_close(direct, checked)
    torch.testing.assert_close(direct, _ref64(x, ec, 0.25, 0.6, eu, 2.5), check_dtype=False)


@pytest.mark.parametrize("name", ["eps_cond", "eps_uncond"])
def test_fake_kernel_rejects_a_meta_argument_beside_cpu(name):
    """Dispatch sends a CPU x_t with a meta eps to the fake kernel, which checks like the
    compiled op instead of returning meta outputs."""
    require_kernels(OP)
    x = torch.zeros(2, 3, 4)
    args = {"eps_cond": x, "eps_uncond": x, name: x.to("meta")}
    with pytest.raises(ValueError, match=f"{name} is on meta but x_t is on cpu"):
        torch.ops.sgdm.guided_ddim_step(x, args["eps_cond"], args["eps_uncond"], None, None, None,
                                        0.5, 0.5, 1.0, 0.0, None)


def test_fallback_matches_kernel(monkeypatch, generator):
    require_kernels(OP)
    x, ec, eu, noise = _tensors((3, 4, 6, 6), generator)
    args = dict(eps_uncond=eu, guidance_scale=2.0, eta=0.4, noise=noise, clip_x0=1.5)
    kernel = ops.guided_ddim_step(x, ec, torch.tensor([0.2, 0.5, 0.7]), 0.8, **args)
    monkeypatch.setattr(_extension, "kernels_enabled", lambda op, device_type: False)
    fallback = ops.guided_ddim_step(x, ec, torch.tensor([0.2, 0.5, 0.7]), 0.8, **args)
    torch.testing.assert_close(kernel, fallback, rtol=1e-5, atol=1e-5)


X = torch.zeros(2, 3, 4)
BAD = [
    (dict(x_t=X[0, 0, 0]), ValueError, r"x_t must be \[B, \.\.\.\]"),
    (dict(x_t=X.int()), TypeError, "x_t must be float32"),
    (dict(eps_cond=X[:1]), ValueError, r"eps_cond has shape \(1, 3, 4\) but x_t has"),
    (dict(eps_cond=X.double()), TypeError, "eps_cond has dtype torch.float64 but x_t has"),
    (dict(eps_cond=X.to("meta")), ValueError, "eps_cond is on meta but x_t is on cpu"),
    (dict(eps_uncond=X[..., :2]), ValueError, "eps_uncond has shape"),
    (dict(noise=X.half(), eta=1.0), TypeError, "noise has dtype"),
    (dict(alpha_bar_t=0.0), ValueError, r"alpha_bar_t must lie in \(0, 1\]"),
    (dict(alpha_bar_prev=1.5), ValueError, r"alpha_bar_prev must lie in \(0, 1\]"),
    (dict(alpha_bar_t=float("nan")), ValueError, "alpha_bar_t must lie in"),
    (dict(alpha_bar_t=torch.tensor([0.5, 0.0])), ValueError, r"every alpha_bar_t must lie in \(0, 1\]"),
    (dict(alpha_bar_prev=torch.tensor([0.5])), ValueError, r"alpha_bar_prev must be .* shape \[B\] = \[2\]"),
    (dict(alpha_bar_t="0.5"), TypeError, "alpha_bar_t must be a number"),
    (dict(eta=-0.1), ValueError, "eta must lie in"),
    (dict(eta=1.5, noise=X), ValueError, r"eta must lie in \[0, 1\], got 1.5"),
    (dict(eta=0.5), ValueError, "noise is required when eta > 0"),
    (dict(clip_x0=0.0), ValueError, "clip_x0 must lie in"),
    (dict(guidance_scale=float("inf")), ValueError, "guidance_scale must be a finite number, got inf"),
]


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize("override,exc,match", BAD)
def test_bad_input_names_the_argument(monkeypatch, kernels, override, exc, match):
    if not kernels:
        monkeypatch.setattr(_extension, "kernels_enabled", lambda op, device_type: False)
    args = dict(x_t=X, eps_cond=X, alpha_bar_t=0.5, alpha_bar_prev=0.7, eps_uncond=None,
                guidance_scale=1.0, eta=0.0, noise=None, clip_x0=None)
    args.update(override)
    with pytest.raises(exc, match=match):
        ops.guided_ddim_step(**args)


def test_raw_op_rejects_bad_input():
    require_kernels(OP)
    with pytest.raises(RuntimeError, match="alpha_bar_t must lie in"):
        torch.ops.sgdm.guided_ddim_step(X, X, None, None, None, None, 0.0, 0.5, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="eps_cond has shape"):
        torch.ops.sgdm.guided_ddim_step(X, X[:1], None, None, None, None, 0.5, 0.5, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"alpha_bar_prev must be a float or a tensor of shape \[2\]"):
        torch.ops.sgdm.guided_ddim_step(X, X, None, None, None, torch.ones(3), 0.5, 0.5, 1.0, 0.0,
                                        None)
