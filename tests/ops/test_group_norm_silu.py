"""sgdm.ops.group_norm_silu against float64 references, on every CPU ISA path (and CUDA)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgdm import ops
from sgdm.ops import _extension
from tests.ops.conftest import CPU_ISAS, cpu_isa_available, require_kernels

OP = "group_norm_silu"

# (shape, groups): odd sizes, C not a multiple of 8, H*W = 1, batch 1, G = C, 1-D and 3-D spatial.
SHAPES = [
    ((2, 6, 5, 7), 3),
    ((1, 12, 9, 11), 4),
    ((3, 10, 1, 1), 5),
    ((2, 32, 4, 4), 32),
    ((2, 20, 33), 2),
    ((1, 9, 3, 4, 5), 3),
    ((2, 64, 8, 8), 1),
]


def _inputs(shape, generator, dtype=torch.float32, device="cpu", affine=True):
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.5).to(dtype)
    c = shape[1]
    w = (torch.randn(c, generator=generator, dtype=torch.float64) + 1).to(dtype) if affine else None
    b = torch.randn(c, generator=generator, dtype=torch.float64).to(dtype) if affine else None
    move = (lambda t: None if t is None else t.to(device))
    return move(x), move(w), move(b)


def _ref64(x, groups, w, b, activation="silu"):
    """float64 oracle: torch's own GroupNorm + SiLU on float64 copies."""
    d = (lambda t: None if t is None else t.double().cpu())
    y = F.group_norm(d(x), groups, d(w), d(b), 1e-5)
    return F.silu(y) if activation == "silu" else y


def _layout(x, kind):
    if kind == "channels_last":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if kind == "strided":  # every other position of a wider tensor
        wide = torch.cat([x, x], dim=-1)
        return wide[..., ::2]
    return x


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("activation", ["silu", None])
def test_forward_matches_float64(target, shape, groups, activation, generator):
    require_kernels(OP, target)
    x, w, b = _inputs(shape, generator, device=target)
    y = ops.group_norm_silu(x, groups, w, b, activation=activation)
    torch.testing.assert_close(y.double().cpu(), _ref64(x, groups, w, b, activation),
                               rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("shape,groups", [((2, 12, 5, 3), 3), ((1, 6, 1, 7), 6), ((2, 24, 4, 4), 8)])
def test_layouts_forward_and_backward(target, layout, shape, groups, generator):
    require_kernels(OP, target)
    x0, w, b = _inputs(shape, generator, device=target)
    x = _layout(x0, layout).requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    y = ops.group_norm_silu(x, groups, w, b)
    if layout == "channels_last":
        assert y.movedim(1, -1).is_contiguous(), "channels-last input must give channels-last output"
    gy = torch.randn(shape, generator=generator, dtype=torch.float64).float().to(target)
    y.backward(gy)
    xr, wr, br = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
    yr = _ref64(xr, groups, wr, br)
    yr.backward(gy.double().cpu())
    torch.testing.assert_close(y.double().cpu(), yr.detach(), rtol=1e-5, atol=2e-5)
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_matches_float64(target, shape, groups, affine, generator):
    require_kernels(OP, target)
    x, w, b = _inputs(shape, generator, device=target, affine=affine)
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    gy = torch.randn(shape, generator=generator, dtype=torch.float64).float().to(target)
    ops.group_norm_silu(x, groups, w, b).backward(gy)
    refs = [t.detach().double().cpu().requires_grad_() for t in params]
    _ref64(refs[0], groups, *(refs[1:] if affine else (None, None))).backward(gy.double().cpu())
    for got, want in zip(params, refs):
        # weight/bias gradients sum over N*H*W terms: absolute error grows with that count.
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_split_across_threads(target, layout, generator):
    """Above the kernels' inline limit (16384 elements) the groups are split into one range
    per thread; NCHW ranges not starting at 0 take their first statistics separately."""
    require_kernels(OP, target)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x0, w, b = _inputs((3, 64, 12, 12), generator, device=target)  # 27648 elements, 24 groups
        x = _layout(x0, layout).requires_grad_()
        gy = torch.randn(x.shape, generator=generator, dtype=torch.float64).float().to(target)
        y = ops.group_norm_silu(x, 8, w, b)
        y.backward(gy)
    finally:
        torch.set_num_threads(threads)
    xr = x.detach().double().cpu().requires_grad_()
    yr = _ref64(xr, 8, w, b)
    yr.backward(gy.double().cpu())
    torch.testing.assert_close(y.double().cpu(), yr.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_same_bits_for_any_thread_count(target, layout, generator):
    """A group's statistics must not depend on whether it opens a thread's range (NCHW sums the
    first group of a range in its own pass, the others fused into the previous group's pass):
    one thread and two give bitwise the same outputs and gradients."""
    if target != "cpu":
        pytest.skip("thread count of the CPU kernels")
    require_kernels(OP, target)
    x0, w, b = _inputs((2, 32, 32, 32), generator)  # 16 groups of 4096: two ranges with 2 threads
    x = _layout(x0, layout)
    gy = torch.randn(x.shape, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
            y = ops.group_norm_silu(xs, 8, ws, bs)
            y.backward(gy)
            results.append([y.detach(), xs.grad, ws.grad, bs.grad])
    finally:
        torch.set_num_threads(threads)
    for name, one, two in zip(("y", "dx", "dweight", "dbias"), *results):
        assert torch.equal(one, two), f"{name}: max difference {(one - two).abs().max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 16, 6, 6), (2, 16, 8, 8)],
                         ids=["hw36", "hw64"])  # hw64: CUDA's 16-byte (8-element) units
def test_reduced_precision_uses_fp32_statistics(target, dtype, shape, generator):
    require_kernels(OP, target)
    x, w, b = _inputs(shape, generator, dtype=dtype, device=target)
    x = x + 50  # a large mean: fp16 statistics would lose the variance
    x.requires_grad_()
    y = ops.group_norm_silu(x, 4, w, b)
    assert y.dtype == dtype
    want = _ref64(x, 4, w, b)  # on the rounded low-precision inputs
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(y.double().cpu(), want, rtol=tol, atol=tol)
    gy = torch.randn(x.shape, generator=generator).to(dtype).to(target)
    y.backward(gy)
    xr = x.detach().double().cpu().requires_grad_()
    _ref64(xr, 4, w, b).backward(gy.double().cpu())
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, rtol=5 * tol, atol=5 * tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 4, 64, 65), (1, 8, 64, 64)],
                         ids=["16384", "16640", "32768"])
def test_large_groups(target, dtype, shape, generator):
    """One group per sample of 16384 elements (CUDA keeps it in registers) and just over
    that size or twice it (CUDA streams the group twice)."""
    require_kernels(OP, target)
    x, w, b = _inputs(shape, generator, dtype=dtype, device=target)
    y = ops.group_norm_silu(x, 1, w, b)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double().cpu(), _ref64(x, 1, w, b), rtol=tol, atol=tol)


def test_gradcheck_float64(generator):
    require_kernels(OP)
    for isa in CPU_ISAS:
        if not cpu_isa_available(isa):
            continue
        with _extension.force_cpu_isa(isa):
            for shape, groups in (((2, 6, 3, 2), 3), ((1, 4, 5), 4)):
                x, w, b = (t.double().requires_grad_() for t in _inputs(shape, generator))
                for act in ("silu", None):
                    assert torch.autograd.gradcheck(
                        lambda x, w, b, act=act: ops.group_norm_silu(x, groups, w, b, activation=act),
                        (x, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared-affine", "per-sample-affine"])
def test_double_backward_gradgradcheck(per_sample, generator):
    """create_graph=True (gradient penalties, Hessian-vector products) differentiates the
    backward too, instead of silently dropping the second-order terms."""
    require_kernels(OP)
    x, w, b = (t.double().requires_grad_() for t in _inputs((2, 6, 3, 2), generator))
    if per_sample:
        w, b = (t.detach().expand(2, 6).clone().requires_grad_() for t in (w, b))
    for act in ("silu", None):
        assert torch.autograd.gradgradcheck(
            lambda x, w, b, act=act: ops.group_norm_silu(x, 3, w, b, activation=act), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x: ops.group_norm_silu(x, 3), (x,))


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "reference"])
def test_empty_batch(monkeypatch, kernels):
    """N = 0 gives an empty output on every backend, as F.group_norm does."""
    if kernels:
        require_kernels(OP)
    else:
        monkeypatch.setattr(_extension, "kernels_enabled", lambda op, device_type: False)
    x = torch.randn(0, 8, 4, 4, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    y = ops.group_norm_silu(x, 4, w, torch.zeros(8))
    assert y.shape == (0, 8, 4, 4)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros(8))


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last, generator):
    require_kernels(OP)
    x, w, b = _inputs((2, 8, 3, 5), generator)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    args = (x.requires_grad_(), 4, w.requires_grad_(), b.requires_grad_(), 1e-5, True)
    torch.library.opcheck(torch.ops.sgdm.group_norm_silu.default, args)
    torch.library.opcheck(torch.ops.sgdm.group_norm_silu.default, (x, 2, None, None, 1e-5, False))


def test_torch_compile_fullgraph(generator):
    require_kernels(OP)
    x, w, b = _inputs((2, 8, 5, 5), generator)
    x.requires_grad_()

    def fn(x, w, b):
        return ops.group_norm_silu(x, 4, w, b) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y = compiled(x, w, b)
    (gx,) = torch.autograd.grad(y.sum(), x)
    want = fn(x, w, b)
    (want_gx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(gx, want_gx)


def test_fallback_matches_kernel(monkeypatch, generator):
    require_kernels(OP)
    x, w, b = _inputs((2, 12, 7, 5), generator)
    x.requires_grad_()
    kernel = ops.group_norm_silu(x, 3, w, b)
    (gk,) = torch.autograd.grad(kernel.sum(), x)
    monkeypatch.setattr(_extension, "kernels_enabled", lambda op, device_type: False)
    fallback = ops.group_norm_silu(x, 3, w, b)
    (gf,) = torch.autograd.grad(fallback.sum(), x)
    torch.testing.assert_close(kernel, fallback, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gk, gf, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize("call,exc,match", [
    (lambda x, w: ops.group_norm_silu(x[0, 0, 0], 2), ValueError, r"x must be \[N, C, \*\]"),
    (lambda x, w: ops.group_norm_silu(x.int(), 2), TypeError, "x must be float32"),
    (lambda x, w: ops.group_norm_silu(x.tolist(), 2), TypeError, "x must be a torch.Tensor"),
    (lambda x, w: ops.group_norm_silu(x, 5), ValueError, "num_groups=5 must divide .* C=6"),
    (lambda x, w: ops.group_norm_silu(x, 0), ValueError, "num_groups must be a positive int"),
    (lambda x, w: ops.group_norm_silu(x, 2.0), ValueError, "num_groups must be a positive int"),
    (lambda x, w: ops.group_norm_silu(x, 2, w[:5]), ValueError, r"weight must have shape \[C\]"),
    (lambda x, w: ops.group_norm_silu(x, 2, None, w.int()), TypeError, "bias must be float32"),
    (lambda x, w: ops.group_norm_silu(x, 2, w.to("meta")), ValueError, "weight is on meta"),
    (lambda x, w: ops.group_norm_silu(x, 2, eps=0.0), ValueError, "eps must lie in"),
    (lambda x, w: ops.group_norm_silu(x, 2, activation="gelu"), ValueError, "activation must be"),
])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_bad_input_names_the_argument(monkeypatch, kernels, call, exc, match, grad):
    """Both wrapper paths (straight to the op without gradients, through the autograd
    Function with them) and the reference report the argument with the same error."""
    if not kernels:
        monkeypatch.setattr(_extension, "kernels_enabled", lambda op, device_type: False)
    x = torch.randn(2, 6, 3, 3, requires_grad=grad)
    with pytest.raises(exc, match=match):
        call(x, torch.ones(6))


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, w: torch.ops.sgdm.group_norm_silu(x, 4, None, None, 1e-5, True), ValueError,
     "num_groups=4 must divide"),
    (lambda x, w: torch.ops.sgdm.group_norm_silu(torch.ones(2, 6, 3, 3), 2, w, None, 1e-5, True), ValueError,
     "weight is on meta but x is on cpu"),
    (lambda x, w: torch.ops.sgdm.group_norm_silu(x, 2, w[:5], None, 1e-5, True), ValueError,
     r"weight must have shape \[C\]"),
])
def test_fake_kernel_checks_like_the_compiled_op(call, exc, match):
    """Meta tensors (and a meta argument beside a CPU one, which dispatch sends to the fake
    kernel) get the compiled op's checks, not a silently shaped result."""
    require_kernels(OP)
    with pytest.raises(exc, match=match):
        call(torch.empty(2, 6, 3, 3, device="meta"), torch.ones(6, device="meta"))


def test_no_grad_call_skips_autograd_and_matches(generator):
    """Without gradients the wrapper calls the op directly (no graph node), with the same
    result as the autograd path; an int eps takes the fully checked path, same result."""
    require_kernels(OP)
    x, w, b = _inputs((3, 8, 5, 4), generator)
    direct = ops.group_norm_silu(x, 4, w, b, eps=1.0)
    assert direct.grad_fn is None
    graph = ops.group_norm_silu(x.clone().requires_grad_(), 4, w, b, eps=1.0)
    assert graph.grad_fn is not None
    checked = ops.group_norm_silu(x, 4, w, b, eps=1)
    torch.testing.assert_close(graph.detach(), direct, rtol=0, atol=0)
    torch.testing.assert_close(checked, direct, rtol=0, atol=0)
    torch.testing.assert_close(direct, F.silu(F.group_norm(x, 4, w, b, eps=1.0)))


@pytest.mark.parametrize("call,exc,match", [
    (lambda x: torch.ops.sgdm.group_norm_silu(x, 4, None, None, 1e-5, True), RuntimeError,
     "num_groups"),
    (lambda x: torch.ops.sgdm.group_norm_silu(x[0, 0, 0], 2, None, None, 1e-5, True), RuntimeError,
     "x must be"),
    (lambda x: torch.ops.sgdm.group_norm_silu(x.int(), 2, None, None, 1e-5, True), TypeError,
     "x must be float"),
    (lambda x: torch.ops.sgdm.group_norm_silu(x, 2, torch.ones(5), None, 1e-5, True), RuntimeError,
     "weight"),
])
def test_raw_op_rejects_bad_input(call, exc, match):
    """The compiled op checks its own arguments too (a clear error, never a crash)."""
    require_kernels(OP)
    with pytest.raises(exc, match=match):
        call(torch.randn(2, 6, 3, 3))


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "reference"])
def test_single_element_groups(monkeypatch, kernels, generator):
    """batch 1, H*W = 1, G = C: every group is one value, so xhat = 0, y = silu(bias), dx = 0."""
    if kernels:
        require_kernels(OP)
    else:
        monkeypatch.setattr(_extension, "kernels_enabled", lambda op, device_type: False)
    x, w, b = _inputs((1, 6, 1, 1), generator)
    x.requires_grad_()
    y = ops.group_norm_silu(x, 6, w, b)
    torch.testing.assert_close(y, F.silu(b).view(1, 6, 1, 1))
    (gx,) = torch.autograd.grad(y.sum(), x)
    # dx = rstd * (dz w - dz w) with rstd = eps^-1/2 ~ 316 magnifies fp32 rounding
    torch.testing.assert_close(gx, torch.zeros_like(x), rtol=0, atol=1e-4)


def test_statistics_survive_large_mean(target, generator):
    """mean 1000, std 0.01: sum / sum-of-squares statistics in fp32 would lose the variance."""
    require_kernels(OP, target)
    x = (1000 + 0.01 * torch.randn(2, 8, 50, 50, generator=generator, dtype=torch.float64))
    y = ops.group_norm_silu(x.float().to(target), 2)
    torch.testing.assert_close(y.double().cpu(), _ref64(x.float(), 2, None, None), rtol=1e-3,
                               atol=2e-3)


# Per-sample affine: weight / bias [N, C] (ADM's scale-shift norm folded into GroupNorm's affine).
# "c" is a shared [C] tensor, "nc" a per-sample [N, C] one, None none.
AFFINE_KINDS = [("nc", "nc"), ("c", "nc"), ("nc", "c"), ("nc", None), (None, "nc")]


def _affine(kind, shape, generator, dtype=torch.float32, device="cpu"):
    if kind is None:
        return None
    size = (shape[1],) if kind == "c" else shape[:2]
    return (torch.randn(size, generator=generator, dtype=torch.float64) + 0.5).to(dtype).to(device)


def _ref64_affine(x, groups, w, b, activation="silu"):
    """float64 oracle: torch's GroupNorm without affine, then w and b broadcast per sample."""
    z = F.group_norm(x.double().cpu(), groups, eps=1e-5)

    def bcast(t):  # [C] or [N, C] -> broadcastable against x
        t = t.double().cpu()
        return t.reshape((t.shape[0] if t.dim() == 2 else 1, t.shape[-1]) + (1,) * (x.dim() - 2))

    if w is not None:
        z = z * bcast(w)
    if b is not None:
        z = z + bcast(b)
    return F.silu(z) if activation == "silu" else z


@pytest.mark.parametrize("kinds", AFFINE_KINDS, ids=lambda k: f"w{k[0]}-b{k[1]}")
@pytest.mark.parametrize("shape,groups,layout", [
    ((2, 6, 5, 7), 3, "contiguous"), ((2, 6, 5, 7), 3, "channels_last"), ((3, 32, 4, 4), 8, "contiguous"),
    ((3, 32, 4, 4), 8, "channels_last"), ((2, 20, 33), 2, "contiguous"), ((1, 12, 3, 4), 4, "channels_last"),
])
def test_per_sample_affine_matches_float64(target, kinds, shape, groups, layout, generator):
    require_kernels(OP, target)
    x = _layout(_inputs(shape, generator, device=target)[0], layout).requires_grad_()
    w, b = (_affine(k, shape, generator, device=target) for k in kinds)
    leaves = [t.requires_grad_() for t in (w, b) if t is not None]
    gy = torch.randn(shape, generator=generator, dtype=torch.float64).float().to(target)
    for activation in ("silu", None):
        y = ops.group_norm_silu(x, groups, w, b, activation=activation)
        grads = torch.autograd.grad(y, [x] + leaves, gy)
        ref = [t.detach().double().cpu().requires_grad_() for t in (x, w, b) if t is not None]
        xr, rest = ref[0], iter(ref[1:])
        wr, br = (next(rest) if t is not None else None for t in (w, b))
        yr = _ref64_affine(xr, groups, wr, br, activation)
        want = torch.autograd.grad(yr, ref, gy.double().cpu())
        torch.testing.assert_close(y.double().cpu(), yr.detach(), rtol=1e-5, atol=2e-5)
        for got, exp, leaf in zip(grads, want, [x] + leaves):
            assert got.shape == leaf.shape, "gradients come back in the shape of their input"
            torch.testing.assert_close(got.double().cpu(), exp, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 16, 6, 6), (2, 16, 8, 8)], ids=["hw36", "hw64"])
def test_per_sample_affine_reduced_precision(target, dtype, shape, generator):
    require_kernels(OP, target)
    x = (_inputs(shape, generator, dtype=dtype, device=target)[0] + 50).requires_grad_()
    w = _affine("nc", shape, generator, device=target).requires_grad_()  # fp32 affine, low-precision x
    b = _affine("nc", shape, generator, dtype=dtype, device=target).requires_grad_()
    y = ops.group_norm_silu(x, 4, w, b)
    assert y.dtype == dtype
    gy = torch.randn(shape, generator=generator).to(dtype).to(target)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    assert (gw.dtype, gb.dtype) == (torch.float32, dtype)
    xr, wr, br = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
    yr = _ref64_affine(xr, 4, wr, br)
    want = torch.autograd.grad(yr, (xr, wr, br), gy.double().cpu())
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(y.double().cpu(), yr.detach(), rtol=tol, atol=tol)
    for got, exp in zip((gx, gw, gb), want):
        torch.testing.assert_close(got.double().cpu(), exp, rtol=5 * tol, atol=5 * tol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_sample_affine_split_across_threads(target, layout, generator):
    """Thread ranges that start mid-sample must still read their own samples' affine rows."""
    require_kernels(OP, target)
    shape = (3, 64, 12, 12)  # 27648 elements, 24 groups: split across two threads
    x = _layout(_inputs(shape, generator, device=target)[0], layout).requires_grad_()
    w, b = (_affine("nc", shape, generator, device=target).requires_grad_() for _ in range(2))
    gy = torch.randn(shape, generator=generator, dtype=torch.float64).float().to(target)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = ops.group_norm_silu(x, 8, w, b)
        grads = torch.autograd.grad(y, (x, w, b), gy)
    finally:
        torch.set_num_threads(threads)
    ref = [t.detach().double().cpu().requires_grad_() for t in (x, w, b)]
    yr = _ref64_affine(ref[0], 8, ref[1], ref[2])
    want = torch.autograd.grad(yr, ref, gy.double().cpu())
    torch.testing.assert_close(y.double().cpu(), yr.detach(), rtol=1e-5, atol=2e-5)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got.double().cpu(), exp, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("kinds", [("nc", "nc"), ("c", "nc"), ("nc", None)], ids=lambda k: f"w{k[0]}-b{k[1]}")
def test_per_sample_affine_gradcheck_float64(target, kinds, generator):
    require_kernels(OP, target)
    for shape, groups in (((2, 6, 3, 2), 3), ((3, 4, 5), 2)):
        x = _inputs(shape, generator, dtype=torch.float64, device=target)[0].requires_grad_()
        w, b = (_affine(k, shape, generator, dtype=torch.float64, device=target) for k in kinds)
        args = tuple(t.requires_grad_() for t in (x, w, b) if t is not None)
        for act in ("silu", None):
            def fn(*a, act=act):
                it = iter(a[1:])
                wi, bi = (next(it) if t is not None else None for t in (w, b))
                return ops.group_norm_silu(a[0], groups, wi, bi, activation=act)
            assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("channels_last", [False, True])
def test_per_sample_affine_opcheck(channels_last, generator):
    require_kernels(OP)
    shape = (2, 8, 3, 5)
    x = _inputs(shape, generator)[0]
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w_nc, b_nc, w_c = (_affine(k, shape, generator) for k in ("nc", "nc", "c"))
    for w, b in ((w_nc, b_nc), (w_c, b_nc), (w_nc, None)):
        args = (x.requires_grad_(), 4, w.requires_grad_(), None if b is None else b.requires_grad_(),
                1e-5, True)
        torch.library.opcheck(torch.ops.sgdm.group_norm_silu.default, args)


def test_per_sample_affine_torch_compile_fullgraph(generator):
    require_kernels(OP)
    shape = (2, 8, 5, 5)
    x = _inputs(shape, generator)[0].requires_grad_()
    w, b = (_affine(k, shape, generator).requires_grad_() for k in ("c", "nc"))
    scale = _affine("nc", shape, generator).requires_grad_()

    def fn(x, w, b, scale):  # the UNet's folded scale-shift: a [C] weight times a per-sample gain
        return ops.group_norm_silu(x, 4, w * (1 + scale), b) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y = compiled(x, w, b, scale)
    got = torch.autograd.grad(y.sum(), (x, w, b, scale))
    want_y = fn(x, w, b, scale)
    want = torch.autograd.grad(want_y.sum(), (x, w, b, scale))
    torch.testing.assert_close(y, want_y)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


def test_per_sample_affine_fallback_matches_kernel(monkeypatch, generator):
    require_kernels(OP)
    shape = (2, 12, 7, 5)
    x = _inputs(shape, generator)[0].requires_grad_()
    w, b = (_affine(k, shape, generator).requires_grad_() for k in ("nc", "c"))
    kernel = ops.group_norm_silu(x, 3, w, b)
    gk = torch.autograd.grad(kernel.sum(), (x, w, b))
    monkeypatch.setattr(_extension, "kernels_enabled", lambda op, device_type: False)
    fallback = ops.group_norm_silu(x, 3, w, b)
    gf = torch.autograd.grad(fallback.sum(), (x, w, b))
    torch.testing.assert_close(kernel, fallback, rtol=1e-5, atol=1e-5)
    for a, e in zip(gk, gf):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize("name,bad", [
    ("weight", (3, 6)), ("weight", (2, 5)), ("weight", (1, 6)), ("bias", (2, 6, 1)), ("bias", (12,)),
])
def test_per_sample_affine_bad_shape_names_the_argument(monkeypatch, kernels, name, bad):
    if kernels:
        require_kernels(OP)
    else:
        monkeypatch.setattr(_extension, "kernels_enabled", lambda op, device_type: False)
    x = torch.randn(2, 6, 3, 3)
    affine = {"weight": None, "bias": None, name: torch.ones(bad)}
    with pytest.raises(ValueError, match=rf"{name} must have shape \[C\] = \[6\] or \[N, C\] = \[2, 6\]"):
        ops.group_norm_silu(x, 2, affine["weight"], affine["bias"])


@pytest.mark.parametrize("name,index", [("weight", 2), ("bias", 3)])
def test_raw_op_rejects_bad_per_sample_shape(name, index):
    require_kernels(OP)
    args = [torch.randn(2, 6, 3, 3), 2, None, None, 1e-5, True]
    args[index] = torch.ones(3, 6)
    with pytest.raises(RuntimeError, match=rf"{name} must have shape \[C\] = \[6\] or \[N, C\] = \[2, 6\]"):
        torch.ops.sgdm.group_norm_silu(*args)
