"""sgdm.ops.attention: the fused kernels against a float64 reference.

Kernel tests run on every CPU ISA path (tests/ops/conftest.py `target`) and on
CUDA when a GPU is present; the fp32 kernel error is held to a small multiple
of fp32 rounding, the fp16/bf16 error to twice PyTorch's own attention error
at the same precision (the issue's low-precision rule).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import importlib
from sgdm.ops.attention import SUPPORTED_HEAD_DIMS, attention, attention_ref
from tests.ops.conftest import require_kernels

OP = "attention"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
attention_module = importlib.import_module("sgdm.ops.attention")  # the package attribute is the function


def _qkv(b, h, nq, nk, d, device, generator, dtype=torch.float32, requires_grad=False):
    g = generator
    q = torch.randn(b, h, nq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, h, nk, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, h, nk, d, generator=g).to(device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _ref64(q, k, v, scale=None, grad_out=None):
    """Output (and q, k, v gradients for grad_out) of the float64 reference."""
    q64, k64, v64 = (t.detach().double().requires_grad_(grad_out is not None) for t in (q, k, v))
    out = attention_ref(q64, k64, v64, scale)
    if grad_out is None:
        return out, None
    out.backward(grad_out.double())
    return out, (q64.grad, k64.grad, v64.grad)


def _rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


SHAPES = [(1, 1, 1, 1), (2, 1, 7, 77), (1, 2, 77, 7), (1, 2, 256, 256), (1, 1, 1000, 1000), (1, 2, 100, 1000)]


@pytest.mark.parametrize("d", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_float64_reference(target, generator, shape, d):
    require_kernels(OP, target)
    b, h, nq, nk = shape
    q, k, v = _qkv(b, h, nq, nk, d, target, generator)
    out = attention(q, k, v)
    assert out.shape == (b, h, nq, d) and out.dtype == torch.float32 and out.is_contiguous()
    assert _rel_err(out.cpu(), _ref64(q.cpu(), k.cpu(), v.cpu())[0]) < 1e-5


@pytest.mark.parametrize("d", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("shape", [(2, 2, 7, 77), (1, 1, 300, 130), (1, 3, 129, 257)],
                         ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_float64_reference(target, generator, shape, d):
    require_kernels(OP, target)
    b, h, nq, nk = shape
    q, k, v = _qkv(b, h, nq, nk, d, target, generator, requires_grad=True)
    grad_out = torch.randn(b, h, nq, d, generator=generator).to(target)
    attention(q, k, v, scale=0.3).backward(grad_out)
    _, grads = _ref64(q.cpu(), k.cpu(), v.cpu(), 0.3, grad_out.cpu())
    for name, t, ref in zip("qkv", (q, k, v), grads):
        assert _rel_err(t.grad.cpu(), ref) < 3e-5, name


def test_large_logits_stay_finite_and_accurate(target, generator):
    """Scores in the hundreds: the online softmax must rescale, never overflow. Rounding
    the scores in fp32 is then itself a ~1e-5 relative error, so the yardstick is
    PyTorch's own fp32 attention on the same inputs."""
    require_kernels(OP, target)
    q, k, v = _qkv(1, 2, 70, 300, 64, target, generator, requires_grad=True)
    grad_out = torch.randn(1, 2, 70, 64, generator=generator).to(target)
    ref, ref_grads = _ref64(q.cpu(), k.cpu(), v.cpu(), 40.0, grad_out.cpu())
    results = []
    for fn in (attention, F.scaled_dot_product_attention):
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v, scale=40.0)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in (q, k, v)])
    for name, ours, torch_, r in zip(("out", "dq", "dk", "dv"), *results, [ref, *ref_grads]):
        assert torch.isfinite(ours).all(), name
        err, torch_err = _rel_err(ours.cpu(), r), _rel_err(torch_.cpu(), r)
        assert err <= 2 * torch_err + 1e-6, f"{name}: {err:.3g} vs torch {torch_err:.3g}"


def test_backward_with_key_splits(generator, monkeypatch):
    """B*H below the thread count: the key range is split across tasks and the
    partial dQ buffers are summed (csrc/attention.cpp backward_splits)."""
    require_kernels(OP)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        q, k, v = _qkv(1, 1, 150, 333, 64, "cpu", generator, requires_grad=True)
        grad_out = torch.randn(1, 1, 150, 64, generator=generator)
        attention(q, k, v).backward(grad_out)
    finally:
        torch.set_num_threads(threads)
    _, grads = _ref64(q, k, v, None, grad_out)
    for name, t, ref in zip("qkv", (q, k, v), grads):
        assert _rel_err(t.grad, ref) < 3e-5, name


def test_only_dq_depends_on_the_thread_count(generator):
    """Every forward task and every key split owns its rows: out, dk and dv are bitwise the
    same for one thread and two (only dq, summed over the key splits, may differ)."""
    require_kernels(OP)
    q0, k0, v0 = _qkv(1, 1, 130, 300, 32, "cpu", generator)  # B*H = 1: two key splits on two threads
    grad_out = torch.randn(1, 1, 130, 32, generator=generator)

    def run():
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = attention(q, k, v)
        out.backward(grad_out)
        return [out.detach(), k.grad, v.grad]

    for name, one, two in zip(("out", "dk", "dv"), *_on_one_and_two_threads(run)):
        assert torch.equal(one, two), name


def _on_one_and_two_threads(run) -> list:
    """``[run() on one torch thread, run() on two]``, the thread count restored after."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run())
        return results
    finally:
        torch.set_num_threads(threads)


def test_small_backward_same_bits_for_any_thread_count(generator):
    """A backward small enough to run on the calling thread (kMinParallelWork) keeps one key
    split, so its dq too is bitwise the same for one thread and two (with two splits it was
    summed from two partial buffers)."""
    require_kernels(OP)
    q0, k0, v0 = _qkv(1, 1, 8, 130, 32, "cpu", generator)  # three key blocks, B*H = 1
    grad_out = torch.randn(1, 1, 8, 32, generator=generator)

    def run():
        q = q0.clone().requires_grad_()
        attention(q, k0, v0).backward(grad_out)
        return q.grad

    assert torch.equal(*_on_one_and_two_threads(run))


def test_forward_rows_do_not_depend_on_the_query_tiling(target, generator):
    """Against 1100 keys at d = 128 (K and V over 1 MiB a head) a CPU forward task takes three
    64-row query blocks (csrc/cpu/attention_kernel.cpp kFwdGroup) and reads K^T from panels
    (pack_panels): every row still matches the float64 reference, and rows 150-213 (across the
    end of the first task) are bitwise what the same rows give on their own, in one block."""
    require_kernels(OP, target)
    if target != "cpu":
        pytest.skip("the CPU kernel's query tiling")
    q, k, v = _qkv(1, 2, 230, 1100, 128, target, generator)
    out = attention(q, k, v)
    assert _rel_err(out, _ref64(q, k, v)[0]) < 1e-5
    assert torch.equal(attention(q[:, :, 150:214], k, v), out[:, :, 150:214])


# Counts the process's threads (OpenMP starts its team at the first parallel region and keeps
# it) around a small forward+backward, then around a large forward.
THREAD_PROBE = textwrap.dedent("""
    import json, os, torch
    from sgdm import ops
    torch.set_num_threads(2)
    threads = lambda: len(os.listdir("/proc/self/task"))
    g = torch.Generator().manual_seed(0)
    before = threads()
    q = torch.randn(1, 4, 16, 32, generator=g, requires_grad=True)  # 4x4 latent, 4 heads
    k, v = (torch.randn(1, 4, 4, 32, generator=g, requires_grad=True) for _ in range(2))  # 4 tokens
    torch.autograd.grad(ops.attention(q, k, v), (q, k, v), torch.randn(1, 4, 16, 32, generator=g))
    small = threads()
    q = torch.randn(1, 8, 4, 32, generator=g)  # 2x2 latent, 8 heads, against 77 text tokens
    k, v = (torch.randn(1, 8, 77, 32, generator=g) for _ in range(2))
    ops.attention(q, k, v)  # packs 19712 elements of K^T
    packed = threads()
    x = torch.randn(1, 4, 256, 64, generator=g)
    ops.attention(x, x, x)
    print(json.dumps({"before": before, "small": small, "packed": packed, "large": threads()}))
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task")
def test_small_calls_stay_on_the_calling_thread():
    """Below the kernels' serial limit (csrc/cpu/attention_kernel.cpp kMinParallelWork) the
    forward and backward run on the calling thread even with two threads allowed: no OpenMP
    team is started (a cross-attention to 4 tokens on a 4x4 latent had 4 tasks of 16 rows,
    each given a thread), not even to pack K^T of a serial forward against 77 keys; a large
    call still starts one, so the count can see a team."""
    require_kernels(OP)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", THREAD_PROBE], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["small"] == counts["before"], counts
    assert counts["packed"] == counts["before"], counts
    assert counts["large"] > counts["packed"], counts


def test_views_of_packed_qkv(target, generator):
    """q, k, v as strided views of one [B, N, 3, H, D] tensor, as a UNet block makes them."""
    require_kernels(OP, target)
    qkv = torch.randn(2, 90, 3, 2, 64, generator=generator).to(target).requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    assert not q.is_contiguous()
    grad_out = torch.randn(2, 2, 90, 64, generator=generator).to(target)
    attention(q, k, v).backward(grad_out)
    ref_qkv = qkv.detach().cpu().double().requires_grad_()
    rq, rk, rv = (t.transpose(1, 2) for t in ref_qkv.unbind(2))
    ref = attention_ref(rq, rk, rv)
    ref.backward(grad_out.cpu().double())
    assert _rel_err(attention(q, k, v).detach().cpu(), ref.detach()) < 1e-5
    assert _rel_err(qkv.grad.cpu(), ref_qkv.grad) < 3e-5


LOW_PRECISION_SHAPES = [pytest.param((2, 2, 200, 150, 64), id="2x2x200x150x64"),
                        pytest.param((1, 2, 1000, 777, 128), id="1x2x1000x777x128", marks=pytest.mark.cuda),
                        pytest.param((3, 1, 77, 1000, 32), id="3x1x77x1000x32", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("shape", LOW_PRECISION_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(target, generator, dtype, shape):
    if target == "cpu" and shape[2] > 256:
        pytest.skip("the long low-precision cases run on CUDA only (test time)")
    require_kernels(OP, target)
    _check_low_precision(target, generator, dtype, shape)


def _check_low_precision(target, generator, dtype, shape):
    """Output and gradients within twice the error of torch's own attention at ``dtype``."""
    b, h, nq, nk, d = shape
    q, k, v = _qkv(b, h, nq, nk, d, target, generator, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(b, h, nq, d, generator=generator).to(target, dtype)
    ref, ref_grads = _ref64(q.cpu(), k.cpu(), v.cpu(), None, grad_out.cpu())

    out = attention(q, k, v)
    assert out.dtype == dtype
    out.backward(grad_out)
    ours = [out.detach()] + [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch_out = F.scaled_dot_product_attention(q, k, v)
    torch_out.backward(grad_out)
    theirs = [torch_out.detach()] + [t.grad for t in (q, k, v)]
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, theirs, [ref, *ref_grads]):
        err, torch_err = _rel_err(a.cpu(), r), _rel_err(b.cpu(), r)
        assert err <= 2 * torch_err + 1e-6, f"{name}: {err:.3g} vs torch {torch_err:.3g}"


def _require_wgmma():
    require_kernels(OP, "cuda")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernels need a compute capability 9.0 GPU")
    if not attention_module.wgmma_built():
        pytest.skip("this build has no sm_90a code (TORCH_CUDA_ARCH_LIST without 9.0a)")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [pytest.param(s, id="x".join(map(str, s))) for s in
                                   [(1, 1, 1, 1, 64), (2, 2, 200, 150, 64), (1, 2, 1000, 777, 128),
                                    (3, 1, 77, 1000, 32), (1, 4, 1000, 77, 64), (2, 1, 129, 129, 64)]])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wgmma_kernels_within_twice_torch_error(generator, monkeypatch, dtype, shape):
    """SGDM_ATTENTION_WGMMA=1 (Hopper): forward and backward under the same accuracy rule (these
    shapes are grids under one wave: the configurations for small calls)."""
    _require_wgmma()
    monkeypatch.setenv("SGDM_ATTENTION_WGMMA", "1")
    _check_low_precision("cuda", generator, dtype, shape)


# B, H, Nq, Nk: a grid of fewer CTAs than an H100 / H200 has SMs (the configurations for one
# partial wave) and one of several waves (attention_hopper.cu picks by the grid)
_WGMMA_GRIDS = [pytest.param((1, 2, 300, 500), id="under-one-wave"),
                pytest.param((4, 8, 1000, 1000), id="several-waves")]


@pytest.mark.cuda
@pytest.mark.parametrize("d", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("grid", _WGMMA_GRIDS)
def test_wgmma_forward_agrees_with_the_mma_sync_forward(generator, monkeypatch, grid, d):
    _require_wgmma()
    q, k, v = _qkv(*grid, d, "cuda", generator, dtype=torch.bfloat16)
    monkeypatch.setenv("SGDM_ATTENTION_WGMMA", "0")
    want, want_lse = torch.ops.sgdm.attention(q, k, v, d ** -0.5)
    monkeypatch.setenv("SGDM_ATTENTION_WGMMA", "1")
    got, got_lse = torch.ops.sgdm.attention(q, k, v, d ** -0.5)
    assert (got.float() - want.float()).abs().max().item() < 2e-2
    assert (got_lse - want_lse).abs().max().item() < 1e-3


def _attention_kernels(q, k, v) -> set[str]:
    """The names of the CUDA kernels a forward and backward of sgdm's attention launch."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        attention(q, k, v).sum().backward()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages() if "attention" in e.key}


@pytest.mark.cuda
@pytest.mark.parametrize("value", [None, "0", "1"])
def test_wgmma_kernels_are_the_default_on_hopper(generator, monkeypatch, value):
    """Without SGDM_ATTENTION_WGMMA (or with =1) a compute capability 9.0 GPU runs the wgmma forward
    and backward; =0 runs the mma.sync kernels."""
    _require_wgmma()
    q, k, v = _qkv(2, 4, 1000, 1000, 64, "cuda", generator, dtype=torch.bfloat16, requires_grad=True)
    if value is None:
        monkeypatch.delenv("SGDM_ATTENTION_WGMMA", raising=False)
    else:
        monkeypatch.setenv("SGDM_ATTENTION_WGMMA", value)
    names = _attention_kernels(q, k, v)
    wgmma = {n for n in names if "wgmma" in n}
    if value == "0":
        assert not wgmma and any("attention_fwd" in n for n in names), names
    else:
        assert any("attention_fwd_wgmma" in n for n in wgmma) and any("attention_bwd_wgmma" in n for n in wgmma), names


@pytest.mark.cuda
@pytest.mark.parametrize("d", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("grid", [pytest.param((2, 4, 700, 900), id="under-one-wave"),
                                  pytest.param((8, 8, 512, 1024), id="several-waves")])
def test_wgmma_backward_agrees_with_the_mma_sync_backward(generator, monkeypatch, grid, d):
    _require_wgmma()
    q, k, v = _qkv(*grid, d, "cuda", generator, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=generator).to("cuda", torch.bfloat16)
    monkeypatch.setenv("SGDM_ATTENTION_WGMMA", "0")
    attention(q, k, v).backward(grad_out)
    want = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    monkeypatch.setenv("SGDM_ATTENTION_WGMMA", "1")
    attention(q, k, v).backward(grad_out)
    for name, t, w in zip("qkv", (q, k, v), want):
        assert _rel_err(t.grad.float(), w.double()) < 2e-2, name


@pytest.mark.cuda
def test_wgmma_request_that_cannot_run_is_an_error(generator, monkeypatch):
    require_kernels(OP, "cuda")
    q, k, v = _qkv(1, 1, 8, 8, 64, "cuda", generator, dtype=torch.bfloat16)
    monkeypatch.setenv("SGDM_ATTENTION_WGMMA", "yes")
    with pytest.raises(RuntimeError, match="SGDM_ATTENTION_WGMMA must be 0 or 1, got 'yes'"):
        attention(q, k, v)
    monkeypatch.setenv("SGDM_ATTENTION_WGMMA", "1")
    if torch.cuda.get_device_capability() == (9, 0) and attention_module.wgmma_built():
        q32, k32, v32 = (t.float() for t in (q, k, v))  # fp32 runs the SIMT kernel either way
        assert _rel_err(attention(q32, k32, v32).cpu(), _ref64(q32.cpu(), k32.cpu(), v32.cpu())[0]) < 1e-5
        pytest.skip("this GPU and build run the wgmma kernels")
    with pytest.raises(RuntimeError, match="SGDM_ATTENTION_WGMMA=1: "):
        attention(q, k, v)


def test_gradcheck_through_both_outputs(generator):
    """Finite differences of the compiled op itself (fp32, so loose tolerances);
    lse is an output too, and its gradient enters the backward as delta -= dL/dlse."""
    require_kernels(OP)
    q, k, v = _qkv(1, 2, 5, 6, 32, "cpu", generator, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not double precision"
        assert torch.autograd.gradcheck(lambda *x: torch.ops.sgdm.attention(*x, 0.5), (q, k, v),
                                        eps=2e-3, atol=2e-3, rtol=2e-2)


def test_float64_gradcheck_of_public_function(generator):
    """float64 runs the reference path; the public function is exactly differentiable."""
    q, k, v = (t.double() for t in _qkv(1, 1, 3, 4, 32, "cpu", generator))
    for t in (q, k, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(attention, (q, k, v))


def _second_order(fn, q, k, v, through_lse=False):
    """Gradients of sum(dL/dq + dL/dk + dL/dv) for L = sum(out^2) (+ sum(lse^2)): a
    Hessian-vector product, which needs the backward itself to be differentiable."""
    if through_lse:
        out, lse = fn(q, k, v)
        loss = out.pow(2).sum() + lse.pow(2).sum()
    else:
        loss = fn(q, k, v).pow(2).sum()
    grads = torch.autograd.grad(loss, (q, k, v), create_graph=True)
    return torch.autograd.grad(sum(g.sum() for g in grads), (q, k, v))


def test_double_backward_matches_the_reference(generator):
    """create_graph=True through the kernel (fp32) gives the reference's second-order
    gradients, not the zeros of a backward op without a derivative."""
    require_kernels(OP)
    q, k, v = _qkv(1, 2, 5, 7, 32, "cpu", generator, requires_grad=True)
    got = _second_order(attention, q, k, v)
    want = _second_order(attention_ref, q, k, v)
    for g, w in zip(got, want):
        assert w.abs().max() > 0.1
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)

    def ref_with_lse(q, k, v):
        s = q @ k.transpose(-1, -2) * 0.5
        return s.softmax(-1) @ v, s.logsumexp(-1)

    got = _second_order(lambda *t: torch.ops.sgdm.attention(*t, 0.5), q, k, v, through_lse=True)
    want = _second_order(ref_with_lse, q, k, v, through_lse=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_opcheck(generator):
    require_kernels(OP)
    q, k, v = _qkv(1, 2, 9, 20, 32, "cpu", generator, requires_grad=True)
    torch.library.opcheck(torch.ops.sgdm.attention.default, (q, k, v, 0.2))
    out, lse = torch.ops.sgdm.attention(q.detach(), k.detach(), v.detach(), 0.2)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.sgdm.attention_backward.default,
                          (grad_out, q.detach(), k.detach(), v.detach(), out, lse, None, 0.2))
    torch.library.opcheck(torch.ops.sgdm.attention_backward.default,
                          (grad_out, q.detach(), k.detach(), v.detach(), out, lse, torch.randn_like(lse), 0.2))


def test_torch_compile_fullgraph(generator):
    require_kernels(OP)
    q, k, v = _qkv(1, 2, 33, 40, 64, "cpu", generator, requires_grad=True)

    def loss(q, k, v):
        return attention(q, k, v).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v))
    want = loss(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_unsupported_head_dim_warns_once_and_uses_torchs_sdpa(generator, monkeypatch):
    # LDM's Churches UNet has head dims 24 / 48 / 96: PyTorch's fused SDPA (O(N) memory), not the
    # reference's N x N scores; float64 keeps the exact reference
    import torch.nn.functional as F

    require_kernels(OP)
    monkeypatch.setattr(attention_module, "_warned_head_dims", set())
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a[0].dtype) or sdpa(*a, **kw))
    q, k, v = _qkv(1, 2, 5, 7, 48, "cpu", generator)
    with pytest.warns(RuntimeWarning, match="head dim 48 .*using torch's scaled_dot_product_attention"):
        out = attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v, scale=0.3)
    assert calls == [torch.float32, torch.float32]
    assert _rel_err(out, _ref64(q, k, v)[0]) < 1e-5
    assert _rel_err(attention(q, k, v, scale=0.3), _ref64(q, k, v, 0.3)[0]) < 1e-5
    out = attention(*(t.double().requires_grad_() for t in (q, k, v)))  # the oracle: float64 reference
    assert calls == [torch.float32] * 3 and out.dtype == torch.float64


def test_reference_path_when_kernels_are_off(generator, monkeypatch):
    """What SGDM_KERNELS=0 or a pure-Python install gives: same results, same errors."""
    monkeypatch.setattr(attention_module._extension, "kernels_enabled", lambda op, device_type: False)
    q, k, v = _qkv(1, 1, 6, 5, 64, "cpu", generator)
    assert _rel_err(attention(q, k, v, scale=0.7), _ref64(q, k, v, 0.7)[0]) < 1e-5
    with pytest.raises(ValueError, match="v has shape"):
        attention(q, k, v[:, :, :4])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_unaligned_storage_offset(generator, dtype):
    """A contiguous view starting one element into its storage cannot feed 16-byte
    cp.async rows; the glue copies it instead of faulting."""
    require_kernels(OP, "cuda")
    n = 2 * 3 * 40 * 64
    flat = torch.randn(3 * n + 1, generator=generator).to("cuda", dtype)
    q, k, v = (flat[1 + i * n: 1 + (i + 1) * n].view(2, 3, 40, 64) for i in range(3))
    assert q.data_ptr() % 16 != 0
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel_err(attention(q, k, v).cpu(), _ref64(q.cpu(), k.cpu(), v.cpu())[0]) < tol


@pytest.mark.cuda
@pytest.mark.parametrize("grad", [False, True])
def test_cuda_batch_times_heads_beyond_the_launch_grid_runs_in_chunks(generator, grad):
    """B * H > 65535 does not fit the CUDA kernels' grid (y dimension): the kernels run on chunks of
    the batch, instead of the op's error (SDPA, the other way out, failed in cuDNN's backward)."""
    require_kernels(OP, "cuda")
    q, k, v = (torch.randn(65536, 1, 4, 32, generator=generator).to("cuda", torch.bfloat16).requires_grad_(grad)
               for _ in range(3))
    out = attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q.detach().float(), k.detach().float(),
                                                            v.detach().float())
    assert out.shape == q.shape and _rel_err(out.detach().float(), want) < 2e-2
    if grad:
        out.sum().backward()
        assert q.grad.shape == q.shape and torch.isfinite(q.grad.float()).all()


@pytest.mark.parametrize("heads, chunked", [(2, True), (5, False)])
def test_batch_beyond_the_grid_runs_the_kernels_in_batch_chunks(generator, monkeypatch, heads, chunked):
    """The chunking of B * H beyond the CUDA grid, on the CPU with the limit made small (4): chunks of
    4 // H batches through the kernel, gradients through torch.cat; H alone beyond the limit runs SDPA."""
    require_kernels(OP)
    monkeypatch.setattr(attention_module, "_CUDA_MAX_BH", 4)
    monkeypatch.setattr(attention_module, "_over_cuda_grid", lambda q: q.shape[0] * q.shape[1] > 4)
    applied, sdpa = [], F.scaled_dot_product_attention
    real_apply = attention_module._Attention.apply
    monkeypatch.setattr(attention_module._Attention, "apply", lambda *a: applied.append(a[0].shape[0]) or real_apply(*a))
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: applied.append("sdpa") or sdpa(*a, **kw))
    q, k, v = _qkv(5, heads, 7, 9, 32, "cpu", generator, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=generator)
    attention(q, k, v).backward(grad_out)
    assert applied == ([2, 2, 1] if chunked else ["sdpa"])
    want, grads = _ref64(q.detach(), k.detach(), v.detach(), grad_out=grad_out)
    assert _rel_err(attention(q.detach(), k.detach(), v.detach()), want) < 1e-5
    for t, g in zip((q, k, v), grads):
        assert _rel_err(t.grad, g) < 1e-4


def _bad_inputs():
    x = torch.zeros(1, 2, 3, 32)
    return [
        ((x[0], x, x), ValueError, r"q must be \[B, H, N, D\]"),
        ((x, x.unsqueeze(0), x), ValueError, r"k must be \[B, H, N, D\]"),
        ((x, x, torch.zeros(1, 2, 3, 16)), ValueError, "v has shape"),
        ((x, torch.zeros(1, 2, 3, 64), torch.zeros(1, 2, 3, 64)), ValueError, "does not match q"),
        ((x, torch.zeros(1, 3, 3, 32), torch.zeros(1, 3, 3, 32)), ValueError, "does not match q"),
        ((x, x.half(), x), TypeError, "k has dtype torch.float16 but q has torch.float32"),
        ((x, x, x.double()), TypeError, "v has dtype torch.float64"),
        ((x.int(), x, x), TypeError, "q must be float32"),
        ((x, x.to("meta"), x), ValueError, "k is on meta but q is on cpu"),
        ((torch.zeros(1, 2, 3, 0),) * 3, ValueError, "q is empty"),  # D = 0 (an empty Nq is fine)
        ((x, torch.zeros(1, 2, 0, 32), torch.zeros(1, 2, 0, 32)), ValueError, "k is empty"),
        (([[1.0]], x, x), TypeError, "q must be a torch.Tensor"),
        ((torch.zeros(()), x, x), ValueError, r"q must be \[B, H, N, D\]"),
    ]


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("args,exc,match", _bad_inputs())
def test_bad_input_names_the_argument(args, exc, match, grad):
    """Straight to the op without gradients, through the autograd Function with them: the
    same named error either way."""
    if grad:
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and
                     a.is_floating_point() else a for a in args)
    with pytest.raises(exc, match=match):
        attention(*args)


def test_no_grad_call_skips_autograd_and_matches(generator):
    require_kernels(OP)
    q, k, v = (torch.randn(2, 3, 9, 32, generator=generator) for _ in range(3))
    direct = attention(q, k, v)
    assert direct.grad_fn is None
    graph = attention(q.clone().requires_grad_(), k, v)
    assert graph.grad_fn is not None
    torch.testing.assert_close(graph.detach(), direct, rtol=0, atol=0)
    torch.testing.assert_close(direct, attention_ref(q.double(), k.double(), v.double()).float())


def test_fake_kernel_rejects_a_meta_argument_beside_cpu():
    """Dispatch sends CPU q with a meta k to the fake kernel, which checks like the C++ op."""
    require_kernels(OP)
    x = torch.zeros(1, 2, 3, 32)
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        torch.ops.sgdm.attention(x, x.to("meta"), x, 1.0)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.1", True])
def test_bad_scale_names_the_argument(scale):
    x = torch.zeros(1, 1, 2, 32)
    with pytest.raises((TypeError, ValueError), match="scale"):
        attention(x, x, x, scale=scale)


def test_compiled_op_checks_its_arguments_too():
    """Direct callers of torch.ops.sgdm.attention get named errors from C++."""
    require_kernels(OP)
    x = torch.zeros(1, 2, 3, 32)
    with pytest.raises(RuntimeError, match="v must have k's shape"):
        torch.ops.sgdm.attention(x, x, torch.zeros(1, 2, 4, 32), 1.0)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.sgdm.attention_backward(x, x, x, x, x, torch.zeros(1, 2, 4), None, 1.0)
    # integer q, k, v would be truncated to the output's integer dtype (the fake kernel refuses them)
    with pytest.raises(TypeError, match="q must be float32, float16, bfloat16 or float64"):
        torch.ops.sgdm.attention(x.long(), x.long(), x.long(), 1.0)
