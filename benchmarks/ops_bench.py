"""Benchmark of the fused ops against the eager PyTorch expressions they replace.

    python benchmarks/ops_bench.py [--device cpu|cuda|all] [--threads 2] [--json out.json]
    python benchmarks/ops_bench.py --small --device cpu    # the UNet's small sampling-time shapes

Prints one row per (op, shape, dtype, device): eager ms, sgdm ms (medians of
interleaved runs in the same process), their ratio, and on CUDA the achieved
GB/s and the share of the memory-bandwidth floor (bytes that must move / the
device-copy bandwidth measured in the same run). Not a test: numbers depend
on the machine and its load; compare ratios, not milliseconds.

On CUDA every call takes the next of several input sets and keeps its outputs
until that set comes round again, so that the data of one call is no longer in
L2 at the next (``rotation_sets``): repeating one 42 MB input on a GPU with a
50 MB L2 measured more than the HBM floor allows.

CPU timings run with glibc's malloc told to keep freed memory (``--allocator
steady``, the default: the script re-executes itself with ``GLIBC_TUNABLES``
raising the mmap and trim thresholds). Otherwise whether an 8 MB temporary comes
back as fresh zeroed pages depends on glibc's sliding thresholds and on what ran
before: eager GroupNorm+SiLU at [8, 256, 32, 32] measured 0.47 ms in one run and
3.2 ms in the next (~4,000 page faults a call), and ratios swung between 1.6x and
2.3x. The steady setting times the kernels' own work, which is the lower ratio
(eager gains more from it); ``--allocator default`` keeps the process as started.

Before an op is timed, its output (and, for fwd+bwd, its input gradients) on the first input set
is compared with the eager expression's (:func:`check_agreement`): a case that disagrees is not
timed, is listed under "mismatches" and makes the exit status 1.

``--small`` times, instead, the shapes a small UNet meets while sampling (batch 1-16, 4x4 to
32x32 latents, attention over 1-256 tokens and cross-attention to 1, 4 or 77 guidance tokens,
against SDPA), where starting the thread team can cost more than the work it splits: the
shapes the CPU kernels' serial thresholds (csrc/cpu/parallel.h) were chosen on. They have no
targets; compare one build against another at --threads 1 and 2.

Targets (fp32, 2-core CPU): GroupNorm+SiLU forward >= 2.0x, forward+backward
>= 1.5x, guided DDIM step >= 4x. H100: GroupNorm+SiLU forward >= 70% of the
floor, guided step >= 80%.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from sgdm import ops

GN_SHAPES = [((8, 256, 32, 32), 32), ((8, 128, 64, 64), 32)]
DDIM_SHAPES = [(64, 4, 32, 32)]
# On a GPU the shapes above take a few microseconds at the bandwidth floor, less than a
# launch: these larger ones (KERNELS.md's floor example; a batch of 64x64 latents) are
# where the floor percentages mean something.
CUDA_GN_SHAPES = [((64, 512, 32, 32), 32)]
CUDA_DDIM_SHAPES = [(256, 4, 64, 64)]
# --small: GroupNorm of 4K-128K elements and guided steps of 256-64K elements (around the kernels'
# serial limit of 16384), attention over B*H x N x Nk x D (B = 1, H = B*H; Nk = N is self-attention)
SMALL_GN_SHAPES = [((1, 64, 8, 8), 32), ((1, 128, 8, 8), 32), ((1, 128, 16, 16), 32),
                   ((1, 256, 16, 16), 32), ((2, 256, 16, 16), 32)]
SMALL_DDIM_SHAPES = [(1, 4, 8, 8), (1, 4, 32, 32), (4, 4, 32, 32), (8, 4, 32, 32), (16, 4, 32, 32)]
SMALL_ATTENTION_CASES = sorted({(1, bh, n, n if nk is None else nk, d) for bh in (1, 4, 8) for n in (1, 16, 64, 256)
                                 for nk in (1, 4, 77, None) for d in (32, 64)})
# glibc malloc: freed blocks up to 4 GiB stay in the heap, and the heap is not trimmed below 16 GiB
STEADY_MALLOC = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
CUDA_INNER = 20  # calls per CUDA-event measurement: back-to-back launches, as in a model
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    device: str
    eager_ms: float
    sgdm_ms: float
    ratio: float
    sgdm_gbps: float
    floor_pct: float | None  # CUDA only: floor time / measured time, in %
    target: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# CPU clock: wall time by default; "cpu" (process CPU time) is robust on a shared,
# overloaded machine but only meaningful with --threads 1 (spinning threads count).
CPU_CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_cpu_clock = time.perf_counter


def _time_once(fn, device: torch.device, calls: int = CUDA_INNER) -> float:
    """Milliseconds of one call: on the GPU, CUDA events around ``calls`` back-to-back
    calls (one call alone would time its launch, not the kernel); the chosen clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = _cpu_clock()
    fn()
    return (_cpu_clock() - t0) * 1e3


CUDA_GRAPHS = False  # --cuda-graphs: replay captured calls, so the host's per-call cost drops out


def _graphed(fn, device: torch.device):
    """One replay of CUDA_INNER calls of ``fn`` captured in a CUDA graph (kernel time
    without the host's per-call cost), or None where ``fn`` cannot be captured."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # capture wants warmed-up allocations on a side stream
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(CUDA_INNER):
                fn()
        return graph.replay
    except RuntimeError as err:
        print(f"ops_bench: not capturable in a CUDA graph, timing plain calls ({err})", file=sys.stderr)
        return None


class Disagreement(Exception):
    """sgdm's op and the baseline it is timed against give different results (the case is not timed)."""


def check_agreement(what: str, got, want, dtype: torch.dtype) -> None:
    """Raises :class:`Disagreement` unless ``got`` (a tensor or a sequence of them) matches ``want``
    within :mod:`sgdm.ops.selfcheck`'s tolerance at ``dtype`` (its error: max |got - want| / max(1,
    max |want|); NaN or inf in ``got`` never matches): a fast wrong result is no result."""
    from sgdm.ops.selfcheck import TOLERANCES, relative_error

    as_list = (lambda t: list(t) if isinstance(t, (tuple, list)) else [t])  # noqa: E731
    error = relative_error(as_list(got), as_list(want))
    if not error <= TOLERANCES[dtype]:  # NaN fails too
        raise Disagreement(f"{what}: sgdm differs from the baseline by {error:.2e} (tolerance "
                           f"{TOLERANCES[dtype]:.0e}): NOT TIMED")


def agrees(what: str, got, want, dtype: torch.dtype, mismatches: list | None) -> bool:
    """:func:`check_agreement` as a test: a disagreement is raised, or, given ``mismatches``, printed and
    appended there (False), so that the caller leaves that timing out and times the rest."""
    try:
        check_agreement(what, got, want, dtype)
        return True
    except Disagreement as err:
        if mismatches is None:
            raise
        print(str(err), file=sys.stderr)
        mismatches.append(str(err))
        return False


def _what(op: str, shape, dtype: torch.dtype, device: torch.device) -> str:
    return f"{op} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} {device.type}"


def compare(eager, fused, device: torch.device, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Medians (ms) of eager and fused, interleaved so both see the same machine load."""
    for _ in range(warmup):
        eager()
        fused()
    _sync(device)
    if device.type == "cuda" and CUDA_GRAPHS:
        ge, gf = _graphed(eager, device), _graphed(fused, device)
        if ge is not None and gf is not None:
            te, tf = [], []
            for _ in range(repeats):  # one replay = CUDA_INNER calls
                te.append(_time_once(ge, device, calls=1) / CUDA_INNER)
                tf.append(_time_once(gf, device, calls=1) / CUDA_INNER)
            return statistics.median(te), statistics.median(tf)
    te, tf = [], []
    for _ in range(repeats):
        te.append(_time_once(eager, device))
        tf.append(_time_once(fused, device))
    return statistics.median(te), statistics.median(tf)


def copy_bandwidth(device: torch.device) -> float:
    """Device-copy bandwidth in B/s (read + write of a 1 GiB-scale buffer), the floor's yardstick."""
    n = 256 * 2**20 if device.type == "cuda" else 16 * 2**20
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = statistics.median(_time_once(lambda: dst.copy_(src), device) for _ in range(10))
    return 2 * n * 4 / (ms * 1e-3)


def rotation_sets(bytes_per_call: int, device: torch.device) -> int:
    """Input sets to cycle through so that a call's inputs and outputs have left L2 by the
    time they come round again (3x L2 of traffic between reuses); 1 on the CPU."""
    if device.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, min(CUDA_INNER, math.ceil(3 * l2 / bytes_per_call)))


def rotating(fn, sets: list):
    """A call of ``fn(*set)`` over ``sets`` in turn. Each result is held until its set
    comes round again, so outputs too land on memory not touched for len(sets) calls.
    One set (the CPU): a plain call whose result is dropped at once, as before rotation."""
    if len(sets) == 1:
        return lambda: fn(*sets[0])
    held = [None] * len(sets)
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % len(sets)
        held[i] = None  # free the last output of this set before allocating the next
        held[i] = fn(*sets[i])
    return call


def _gn_inputs(shape, dtype, device, gen, grad):
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)
    # affine parameters in the input's dtype, as in a model cast with .to(dtype); eager
    # F.group_norm refuses mixed dtypes on CUDA
    w = torch.randn(shape[1], generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)
    b = torch.randn(shape[1], generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)
    return x, w, b


def bench_group_norm(shape, groups, dtype, device, repeats, gen, bw, mismatches: list | None = None) -> list[Row]:
    """The forward and the forward+backward rows; each checked first (:func:`agrees`)."""
    rows = []
    n_bytes = math.prod(shape) * torch.finfo(dtype).bits // 8
    sets = [_gn_inputs(shape, dtype, device, gen, grad=False)
            for _ in range(rotation_sets(2 * n_bytes, device))]
    eager_fwd = lambda x, w, b: F.silu(F.group_norm(x, groups, w, b))  # noqa: E731
    fused_fwd = lambda x, w, b: ops.group_norm_silu(x, groups, w, b)  # noqa: E731
    with torch.no_grad():
        if agrees(_what("group_norm_silu fwd", shape, dtype, device), fused_fwd(*sets[0]), eager_fwd(*sets[0]),
                  dtype, mismatches):
            te, tf = compare(rotating(eager_fwd, sets), rotating(fused_fwd, sets), device, repeats)
            rows.append(_row("group_norm_silu fwd", shape, dtype, device, te, tf, 2 * n_bytes, bw, ">=2.0x cpu"))
    sets = [_gn_inputs(shape, dtype, device, gen, grad=True)
            + (torch.randn(shape, generator=gen).to(device=device, dtype=dtype),)
            for _ in range(rotation_sets(5 * n_bytes, device))]

    # Gradients are returned, as for a layer inside a network, not accumulated into the
    # leaves' .grad: accumulation added an 8 MB read-modify-write of x.grad (0.1-0.4 ms)
    # to both sides that no training step has (x is an activation there).
    def step(fn):
        def run(x, w, b, gy):
            return torch.autograd.grad(fn(x, w, b), (x, w, b), gy)
        return run

    if agrees(_what("group_norm_silu fwd+bwd", shape, dtype, device), step(fused_fwd)(*sets[0]),
              step(eager_fwd)(*sets[0]), dtype, mismatches):
        te, tf = compare(rotating(step(eager_fwd), sets), rotating(step(fused_fwd), sets), device, repeats)
        # floor: forward reads x, writes y; backward reads x, dy, writes dx
        rows.append(_row("group_norm_silu fwd+bwd", shape, dtype, device, te, tf, 5 * n_bytes, bw,
                         ">=1.5x cpu"))
    return rows


def eager_guided_ddim(x, ec, eu, a_t, a_prev, w):
    """The eager expression the fused step replaces (eta = 0, paper Eq. 4 + DDIM Eq. 12)."""
    eps = (1.0 - w) * eu + w * ec
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps, x0


def bench_ddim(shape, dtype, device, repeats, gen, bw) -> Row:
    n_bytes = math.prod(shape) * torch.finfo(dtype).bits // 8
    sets = [tuple(torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
            for _ in range(rotation_sets(5 * n_bytes, device))]
    eager = lambda x, ec, eu: eager_guided_ddim(x, ec, eu, 0.3, 0.5, 2.0)  # noqa: E731
    fused = lambda x, ec, eu: ops.guided_ddim_step(x, ec, 0.3, 0.5, eps_uncond=eu, guidance_scale=2.0)  # noqa: E731
    check_agreement(_what("guided_ddim_step", shape, dtype, device), fused(*sets[0]), eager(*sets[0]), dtype)
    te, tf = compare(rotating(eager, sets), rotating(fused, sets), device, repeats)
    return _row("guided_ddim_step", shape, dtype, device, te, tf, 5 * n_bytes, bw, ">=4x cpu")


def bench_attention(case, dtype, device, repeats, gen, bw, mismatches: list | None = None) -> list[Row]:
    """sgdm.ops.attention against SDPA on ``case`` = (B, H, Nq, Nk, D), forward and forward+backward
    (gradients returned, as in :func:`bench_group_norm`); each checked first (:func:`agrees`). No
    targets (benchmarks/attention_bench.py has the large-N ones)."""
    b, h, nq, nk, d = case
    q = torch.randn(b, h, nq, d, generator=gen).to(device=device, dtype=dtype)
    k, v = (torch.randn(b, h, nk, d, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    grad_out = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    n_bytes = (2 * q.numel() + 2 * k.numel()) * torch.finfo(dtype).bits // 8  # q, k, v in, out
    rows = []
    for backward in (False, True):
        qkv = [t.detach().requires_grad_(backward) for t in (q, k, v)]

        def call(fn):
            if backward:
                return lambda: torch.autograd.grad(fn(*qkv), qkv, grad_out)
            return lambda: fn(*qkv)

        op = "attention " + ("fwd+bwd" if backward else "fwd")
        with torch.set_grad_enabled(backward):
            eager, fused = call(F.scaled_dot_product_attention), call(ops.attention)
            if agrees(_what(op, case, dtype, device), fused(), eager(), dtype, mismatches):
                te, tf = compare(eager, fused, device, repeats)
                row = _row(op, case, dtype, device, te, tf, n_bytes * (2 if backward else 1), bw, "")
                rows.append(dataclasses.replace(row, target=""))
    return rows


def _row(op, shape, dtype, device, te, tf, floor_bytes, bw, target) -> Row:
    floor = 100.0 * (floor_bytes / bw) / (tf * 1e-3) if device.type == "cuda" else None
    return Row(op, "x".join(map(str, shape)), str(dtype).replace("torch.", ""), device.type,
               te, tf, te / tf, floor_bytes / (tf * 1e-3) / 1e9, floor,
               # the CPU targets are fp32's (docstring); a float16 / bfloat16 row has none
               (target if dtype == torch.float32 else "") if device.type == "cpu" else
               (">=70%" if "fwd" == op.split()[-1] else ">=80%" if op == "guided_ddim_step" else ""))


# Timed calls per side when --repeats is not given. The CPU takes 200: with 40, one guided DDIM
# row (160 calls of ~33 us, 2 threads) spans ~30 ms of a shared VM, and idle runs scattered
# 3.87-4.22x; with 200 (800 calls) six runs gave 4.08-4.24x (benchmarks/RESULTS.md).
DEFAULT_REPEATS = {"cpu": 200, "cuda": 40}


def run(devices, dtypes, threads, repeats=None, small: bool = False) -> dict:
    """Rows for every op, shape and dtype on ``devices``; ``repeats``: timed calls per side
    (guided DDIM 4x), default :data:`DEFAULT_REPEATS` per device type. ``small``: the
    SMALL_* shapes (attention included) instead of the default ones."""
    torch.set_num_threads(threads)  # the same for both sides of every ratio
    gen = torch.Generator().manual_seed(0)
    rows, mismatches, env = [], [], {"torch": torch.__version__, "python": platform.python_version(),
                     "threads": threads, "backend": {}}
    for name in devices:
        device = torch.device(name)
        bw = copy_bandwidth(device)
        env["backend"][name] = ops.backend(device.type)
        env[f"{name}_copy_GBps"] = bw / 1e9
        env[f"{name}_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                               else platform.processor() or platform.machine())
        extra = device.type == "cuda" and not small
        reps = repeats if repeats is not None else DEFAULT_REPEATS[device.type]
        gn_shapes, ddim_shapes = (SMALL_GN_SHAPES, SMALL_DDIM_SHAPES) if small else (GN_SHAPES, DDIM_SHAPES)
        # a disagreement leaves that timing out; the rest still runs, and the exit status says it
        for dtype in dtypes:
            for shape, groups in gn_shapes + (CUDA_GN_SHAPES if extra else []):
                rows += bench_group_norm(shape, groups, dtype, device, reps, gen, bw, mismatches)
            for case in SMALL_ATTENTION_CASES if small else []:
                rows += bench_attention(case, dtype, device, reps, gen, bw, mismatches)
            for shape in ddim_shapes + (CUDA_DDIM_SHAPES if extra else []):
                try:
                    rows.append(bench_ddim(shape, dtype, device, reps * 4, gen, bw))
                except Disagreement as err:
                    print(str(err), file=sys.stderr)
                    mismatches.append(str(err))
    if small:  # the targets are the default shapes'
        rows = [dataclasses.replace(r, target="") for r in rows]
    return {"env": env, "rows": [asdict(r) for r in rows], "mismatches": mismatches}


def format_table(result: dict) -> str:
    head = f"{'op':<24} {'shape':<14} {'dtype':<9} {'dev':<5} {'eager ms':>9} {'sgdm ms':>9} " \
           f"{'ratio':>6} {'GB/s':>7} {'floor%':>7}  target"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        floor = "" if r["floor_pct"] is None else f"{r['floor_pct']:.0f}"
        lines.append(f"{r['op']:<24} {r['shape']:<14} {r['dtype']:<9} {r['device']:<5} "
                     f"{r['eager_ms']:>9.3f} {r['sgdm_ms']:>9.3f} {r['ratio']:>5.2f}x "
                     f"{r['sgdm_gbps']:>7.1f} {floor:>7}  {r['target']}")
    env = result["env"]
    lines.append(f"torch {env['torch']}, {env['threads']} threads, CPU clock "
                 f"{env.get('cpu_clock', 'wall')}, malloc {'steady' if 'malloc.trim_threshold' in env.get('glibc_tunables', '') else 'default'}, "
                 f"backends {env['backend']}")
    return "\n".join(lines)


def smoke(device: torch.device) -> int:
    """Each op once on small odd shapes (forward and backward), checked against the float64
    references (:mod:`sgdm.ops.selfcheck`, also ``sgdm-ldm info --check``): what compute-sanitizer
    runs in benchmarks/gpu_check.sh."""
    from sgdm.ops.selfcheck import check_ops

    results = check_ops(device, (torch.float32, torch.bfloat16), ("group_norm_silu", "guided_ddim_step"))
    failures = [r for r in results if not r.ok]
    for r in failures:
        print(r.line())
    print(f"smoke on {device}: backends {ops.backend(device.type)}, {len(failures)} mismatches")
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="'all': the CPU, and CUDA when present")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32"])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (both sides)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed calls per side (guided DDIM: 4x); default {DEFAULT_REPEATS['cpu']} on the CPU, "
                        f"{DEFAULT_REPEATS['cuda']} on CUDA")
    p.add_argument("--clock", choices=sorted(CPU_CLOCK), default="wall",
                   help="CPU timing clock; 'cpu' (process time) resists machine load, use with "
                        "--threads 1")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA: time replays of captured calls (kernel time; the host's per-call "
                        "cost, which bounds small ops, drops out); falls back to plain calls")
    p.add_argument("--smoke", action="store_true",
                   help="no timing: run each op once on small shapes and check it (for sanitizers)")
    p.add_argument("--small", action="store_true",
                   help="time the small shapes of a UNet at sampling time (SMALL_*: GroupNorm, guided step, "
                        "attention vs SDPA) instead of the default ones")
    p.add_argument("--attention", action="store_true",
                   help="also time sgdm.ops.attention vs SDPA (benchmarks/attention_bench.py; slow on CPU)")
    p.add_argument("--allocator", choices=["steady", "default"], default="steady",
                   help="CPU: 'steady' re-runs this script with glibc malloc keeping freed memory, so "
                        "page faults of fresh temporaries do not swing the timings (see the docstring)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads: expected at least 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats: expected at least 1 timed call, got {args.repeats}")
    if args.allocator == "steady" and args.device != "cuda" and "glibc.malloc.trim_threshold" not in \
            os.environ.get("GLIBC_TUNABLES", "") and platform.libc_ver()[0] == "glibc":
        os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), STEADY_MALLOC]))
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__),
                                  *(sys.argv[1:] if argv is None else argv)])
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else \
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU visible")
    global _cpu_clock, CUDA_GRAPHS
    _cpu_clock = CPU_CLOCK[args.clock]
    CUDA_GRAPHS = args.cuda_graphs
    if args.smoke:
        return max(smoke(torch.device(d)) for d in devices)
    result = run(devices, [DTYPES[d] for d in args.dtype], args.threads, args.repeats, args.small)
    result["env"]["cpu_clock"] = args.clock
    result["env"]["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    result["env"]["cuda_graphs"] = args.cuda_graphs
    if args.attention:
        import attention_bench  # benchmarks/ is sys.path[0]
        attention = attention_bench.run(devices, [DTYPES[d] for d in args.dtype], args.threads,
                                        args.repeats or DEFAULT_REPEATS["cuda"], with_memory=False)
        result["rows"] += attention["rows"]
        result["mismatches"] += attention["mismatches"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(format_table(result))
    for text in result["mismatches"]:
        print(f"MISMATCH {text}")
    return 1 if result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
