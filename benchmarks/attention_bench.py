"""Benchmark of sgdm.ops.attention against torch's scaled_dot_product_attention.

    python benchmarks/attention_bench.py [--device cpu|cuda|all] [--threads 2] [--json out.json]
    python benchmarks/attention_bench.py --smoke --device cuda     # for compute-sanitizer

Forward and forward+backward, medians of interleaved runs in one process,
ratio = baseline time / sgdm time (> 1: sgdm faster) and TFLOP/s with the
issue's count: forward 4 B H Nq Nk D, backward 2.5x that. The CPU baseline is
SDPA (its own flash kernel); on CUDA each SDPA backend (flash, cuDNN) is timed
separately and the ratio is against the best. On a compute capability 9.0 GPU
with a 9.0a build, sgdm's rows are its Hopper wgmma kernels (the default there), and
rows marked "[mma.sync]" time sgdm again with the mma.sync kernels
(SGDM_ATTENTION_WGMMA=0) against that backend. On the CPU the peak resident
memory of one forward+backward is shown for sgdm, SDPA and eager math
attention (softmax(q k^T) v, which stores N x N scores): sgdm stays O(N).
Before timing, sgdm's output (and input gradients) is checked against each baseline's
(``ops_bench.check_agreement``); a case that disagrees is not timed, is listed under
"mismatches" and makes the exit status 1. ``--seq-len 256`` (e.g.) replaces N for a
quick run; the CPU's default N = 4096 takes minutes.

Targets: CPU fp32, B*H=16, D=64, N in {1024, 4096}: forward and forward+backward
>= 1.0x SDPA. H100 bf16, D=64, N in {1024, 4096}, B*H=64: forward >= 0.7x the
best SDPA backend, forward+backward >= 0.6x.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ctypes
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

import ops_bench  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)
from sgdm import ops
from sgdm.ops.attention import attention_ref, wgmma_built

CPU_CASES = [(1, 16, 1024, 64), (1, 16, 4096, 64)]  # B, H, N, D: B*H = 16
CUDA_CASES = [(4, 16, 1024, 64), (4, 16, 4096, 64)]  # B*H = 64
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def flops(b, h, n, d, backward: bool) -> float:
    fwd = 4.0 * b * h * n * n * d
    return fwd * 3.5 if backward else fwd


def _inputs(case, dtype, device, gen, grad):
    b, h, n, d = case
    return [torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)
            for _ in range(3)]


def _sdpa_backends(device: torch.device) -> dict:
    """Name -> context manager selecting that SDPA backend (CPU: the default choice)."""
    if device.type != "cuda":
        return {"sdpa": contextlib.nullcontext}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return {"sdpa-flash": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION),
            "sdpa-cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)}


@contextlib.contextmanager
def _mma_sync():
    """SGDM_ATTENTION_WGMMA=0 inside the block (the extension reads it at each call): the mma.sync
    kernels on a Hopper GPU too."""
    before = os.environ.get("SGDM_ATTENTION_WGMMA")
    os.environ["SGDM_ATTENTION_WGMMA"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["SGDM_ATTENTION_WGMMA"]
        else:
            os.environ["SGDM_ATTENTION_WGMMA"] = before


def wgmma_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether sgdm runs its Hopper wgmma kernels here (a 9.0 GPU, a 9.0a build, 16-bit, and
    SGDM_ATTENTION_WGMMA not 0)."""
    return (device.type == "cuda" and dtype != torch.float32 and wgmma_built()
            and os.environ.get("SGDM_ATTENTION_WGMMA") != "0"
            and torch.cuda.get_device_capability(device) == (9, 0))


def _row(case, dtype, device, backward, impl, name, t_base, t_ours) -> dict:
    fl = flops(*case, backward)
    b, h, n, d = case
    n_bytes = 4 * b * h * n * d * torch.finfo(dtype).bits // 8 * (2 if backward else 1)
    return {
        "op": "attention " + ("fwd+bwd" if backward else "fwd") + (f" [{impl}]" if impl else ""),
        "shape": f"{b}x{h}x{n}x{d}", "dtype": str(dtype).replace("torch.", ""), "device": device.type,
        "baseline": name, "eager_ms": t_base, "sgdm_ms": t_ours, "ratio": t_base / t_ours,
        "sgdm_gbps": n_bytes / (t_ours * 1e-3) / 1e9, "floor_pct": None,
        "sgdm_tflops": fl / (t_ours * 1e-3) / 1e12, "baseline_tflops": fl / (t_base * 1e-3) / 1e12,
        "target": (">=1.0x" if device.type == "cpu" else (">=0.6x" if backward else ">=0.7x")),
    }


def bench_case(case, dtype, device, repeats, gen, both_kernels: bool, mismatches: list | None = None) -> list[dict]:
    """sgdm against the best SDPA backend; where sgdm runs its Hopper wgmma kernels and
    ``both_kernels``, also sgdm with the mma.sync kernels against that backend, timed again in the
    same run. Each is first checked against the baseline:
    a disagreement raises :class:`ops_bench.Disagreement`, or, given ``mismatches``, is appended
    there and that timing (only) is left out."""
    def agrees(what, got, want) -> bool:
        return ops_bench.agrees(what, got, want, dtype, mismatches)

    rows = []
    backends = _sdpa_backends(device)
    for backward in (False, True):
        q, k, v = _inputs(case, dtype, device, gen, grad=backward)
        grad_out = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)

        def run(fn):
            if not backward:
                return lambda: fn(q, k, v)
            # gradients returned, not accumulated into .grad: accumulating added a read-modify-write
            # of three q-sized tensors to both sides that no training step has (as in ops_bench)
            return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

        what = ops_bench._what("attention " + ("fwd+bwd" if backward else "fwd"), case, dtype, device)
        with torch.set_grad_enabled(backward):
            best = None
            for name, ctx in backends.items():
                with ctx():
                    try:  # the baseline alone: an error of sgdm's own must not pass for an unavailable backend
                        want = run(F.scaled_dot_product_attention)()
                    except RuntimeError as exc:  # backend unavailable for this dtype / card
                        print(f"  {name}: unavailable ({str(exc).splitlines()[0]})", file=sys.stderr)
                        continue
                    if not agrees(f"{what} vs {name}", run(ops.attention)(), want):
                        continue
                    t_base, t_ours = ops_bench.compare(run(F.scaled_dot_product_attention), run(ops.attention),
                                                       device, repeats)
                if best is None or t_base < best[1]:
                    best = (name, t_base, t_ours)
            if best is None:
                continue
            rows.append(_row(case, dtype, device, backward, "", *best))
            if both_kernels and wgmma_runs(device, dtype):
                with backends[best[0]](), _mma_sync():
                    if agrees(f"{what} [mma.sync] vs {best[0]}", run(ops.attention)(),
                              run(F.scaled_dot_product_attention)()):
                        t_base, t_ours = ops_bench.compare(run(F.scaled_dot_product_attention), run(ops.attention),
                                                           device, repeats)
                        rows.append(_row(case, dtype, device, backward, "mma.sync", best[0], t_base, t_ours))
    return rows


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_mib(fn) -> float | None:
    """Peak resident memory (MiB) above the level before fn(), via Linux's VmHWM reset.

    Freed heap is first handed back to the OS (malloc_trim) so that reused pages
    count as new ones."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmRSS")
        fn()
        return (_rss_kib("VmHWM") - before) / 1024
    except OSError:
        return None


def memory_rows(case, gen) -> list[dict]:
    """Peak memory of one fp32 forward+backward on the CPU: sgdm vs SDPA vs eager math."""
    q, k, v = _inputs(case, torch.float32, torch.device("cpu"), gen, grad=True)
    grad_out = torch.randn(q.shape, generator=gen)
    rows = []
    for name, fn in (("sgdm", ops.attention), ("sdpa", F.scaled_dot_product_attention),
                     ("eager math", attention_ref)):
        def step():
            torch.autograd.backward(fn(q, k, v), grad_out)
            for t in (q, k, v):
                t.grad = None
        step()  # warm up allocator and thread pool
        rows.append({"impl": name, "shape": "x".join(map(str, case)), "peak_extra_mib": peak_extra_mib(step)})
    return rows


def run(devices, dtypes, threads, repeats, with_memory: bool, both_kernels: bool = True, seq_lens=None) -> dict:
    """Rows for every case on ``devices``; ``seq_lens``: the N of the cases instead of the default ones
    (B, H, D as in CPU_CASES / CUDA_CASES). A case whose result disagrees with SDPA's is left out and
    listed under "mismatches"."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": threads, "backend": {}}
    rows, memory, mismatches = [], [], []
    for name in devices:
        device = torch.device(name)
        env["backend"][name] = ops.backend(device.type)["attention"]
        env[f"{name}_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                               else platform.processor() or platform.machine())
        cases = CUDA_CASES if device.type == "cuda" else CPU_CASES
        if seq_lens:
            b, h, _, d = cases[0]
            cases = [(b, h, n, d) for n in seq_lens]
        for dtype in (dtypes if device.type == "cuda" else [torch.float32]):
            for case in cases:
                cpu_reps = max(3, repeats // (4 * max(1, case[2] // 1024) ** 2))  # N=4096: minutes
                reps = repeats if device.type == "cuda" else cpu_reps
                # a disagreement leaves that timing out; the rest still runs, and the exit status says it
                rows += bench_case(case, dtype, device, reps, gen, both_kernels, mismatches)
        if device.type == "cpu" and with_memory:
            memory += memory_rows(cases[-1], gen)
    return {"env": env, "rows": rows, "memory": memory, "mismatches": mismatches}


def format_table(result: dict) -> str:
    head = f"{'op':<30} {'shape':<14} {'dtype':<9} {'dev':<5} {'baseline':<11} {'base ms':>9} " \
           f"{'sgdm ms':>9} {'ratio':>6} {'base TF/s':>9} {'sgdm TF/s':>9}  target"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['op']:<30} {r['shape']:<14} {r['dtype']:<9} {r['device']:<5} {r['baseline']:<11} "
                     f"{r['eager_ms']:>9.2f} {r['sgdm_ms']:>9.2f} {r['ratio']:>5.2f}x "
                     f"{r['baseline_tflops']:>9.3f} {r['sgdm_tflops']:>9.3f}  {r['target']}")
    for m in result.get("memory", []):
        peak = "n/a" if m["peak_extra_mib"] is None else f"{m['peak_extra_mib']:.0f} MiB"
        lines.append(f"peak memory, fp32 fwd+bwd {m['shape']} cpu, {m['impl']:<10}: {peak}")
    env = result["env"]
    lines.append(f"torch {env['torch']}, {env['threads']} CPU threads, backends {env['backend']}, "
                 f"devices {[env[k] for k in env if k.endswith('_name')]}")
    return "\n".join(lines)


def smoke(device: torch.device) -> int:
    """Forward and backward once per (dtype, head dim) on odd shapes, checked against the float64
    reference (:mod:`sgdm.ops.selfcheck`, also ``sgdm-ldm info --check``), and where sgdm runs its
    wgmma kernels again through the mma.sync ones: what compute-sanitizer runs in gpu_check.sh."""
    from sgdm.ops.selfcheck import check_ops

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    hopper = [dtype for dtype in dtypes if wgmma_runs(device, dtype)]
    names = {str(dtype).replace("torch.", "") for dtype in hopper}  # OpCheck.dtype's spelling
    results = [dataclasses.replace(r, backend="wgmma") if r.dtype in names else r
               for r in check_ops(device, dtypes, ("attention",))]
    if hopper:
        with _mma_sync():
            results += [dataclasses.replace(r, backend="mma.sync") for r in check_ops(device, hopper, ("attention",))]
    failures = [r for r in results if not r.ok]
    for r in failures:
        print(r.line())
    print(f"attention smoke on {device}: backend {ops.backend(device.type)['attention']}"
          f"{' (wgmma for 16-bit, and mma.sync)' if hopper else ''}, {len(failures)} mismatches")
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="'all': the CPU, and CUDA when present")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bfloat16"],
                   help="CUDA dtypes (the CPU always runs float32, the target case)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (both sides)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per side (fewer on the CPU)")
    p.add_argument("--seq-len", type=int, nargs="+", default=None, metavar="N",
                   help="sequence lengths to run instead of the default cases' (1024 4096); e.g. 256 for a quick run")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory comparison")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--smoke", action="store_true", help="no timing: run once per dtype/head dim and check")
    p.add_argument("--no-wgmma", action="store_true",
                   help="run the mma.sync kernels on a Hopper GPU too (SGDM_ATTENTION_WGMMA=0), and no "
                        "[mma.sync] rows")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats: expected at least 1 timed call, got {args.repeats}")
    if args.threads < 1:
        p.error(f"--threads: expected at least 1, got {args.threads}")
    if args.seq_len and min(args.seq_len) < 1:
        p.error(f"--seq-len: expected sequence lengths >= 1, got {args.seq_len}")
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else \
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU visible")
    if args.no_wgmma:
        os.environ["SGDM_ATTENTION_WGMMA"] = "0"
    if args.smoke:
        return max(smoke(torch.device(d)) for d in devices)
    result = run(devices, [DTYPES[d] for d in args.dtype], args.threads, args.repeats, not args.no_memory,
                 not args.no_wgmma, args.seq_len)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(format_table(result))
    for text in result["mismatches"]:
        print(f"MISMATCH {text}")
    return 1 if result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
