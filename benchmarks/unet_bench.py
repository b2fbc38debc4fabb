"""UNet training step and guided sampling step: sgdm kernels vs ``SGDM_KERNELS=0`` (``--compare
kernels``, the default), or the UNet under ``torch.compile`` vs eager, both with the kernels
(``--compare compile``; the compiles fall in the ``--warmup`` iterations), same run.

Each setting runs in its own subprocess (the extension is loaded once per process),
alternating settings over ``--rounds`` in ABBA order so that machine load and warm-up
affect both alike; the per-round medians are printed too.
Reported: median forward+backward time of the label-guided UNet (one training
step without the optimizer), median time of one guided DDIM sampling step (cond and
uncond halves batched in one UNet call, then ``sgdm.ops.guided_ddim_step`` with
eps = (1 - w) eps_uncond + w eps_cond), peak memory, the op backends in use, and
the time ratios of the two settings. Before timing, each first-round worker saves the UNet's
sampling output on the shared inputs (same seed, same weights); the two settings must agree
(relative L2 error under 1e-2 in fp32, 1e-1 in bf16: loose enough for TF32 convolutions and
bf16 rounding through the network, while a wrong kernel is off by O(1)), else the times are
printed with a MISMATCH line and the exit status is 1.

    python benchmarks/unet_bench.py                 # small config on CPU; Churches on GPU if present
    python benchmarks/unet_bench.py --config churches --device cuda --precision bf16
    python benchmarks/unet_bench.py --compare compile --warmup 3
    python benchmarks/unet_bench.py --device cpu --batch 2 --iters 1 --warmup 1 --rounds 1   # quick
    python benchmarks/unet_bench.py --config quickstart --device cpu --batch 16   # configs/quickstart.yaml's UNet
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SMALL = dict(channels=64, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[8, 4], image_size=16,
             num_heads=-1, num_head_channels=32, norm_groups=32)
CHURCHES: dict = {}  # UNetConfig defaults are the LSUN-Churches LDM
NUM_CLASSES = 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart_unet():
    """(UNetConfig, K) of configs/quickstart.yaml: the UNet CPU users train and sample (8x8x4 latents)."""
    from sgdm.config.schema import load_experiment

    cfg = load_experiment(os.path.join(ROOT, "configs", "quickstart.yaml"),
                          ["prepare.autoencoder=false", "model.autoencoder.checkpoint=null"])
    return cfg.model.unet, cfg.model.guidance.num_classes


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# CPU clock: wall time by default; "cpu" (process CPU time) resists a loaded machine but is
# only meaningful with one thread (with more, spinning OpenMP threads count too).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time(fn, device, warmup: int, iters: int, clock=time.perf_counter) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = clock()
        fn()
        _sync(device)
        times.append(clock() - start)
    return times


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _backends(device_type: str) -> dict:
    """Which implementation each op runs (as reported by sgdm.ops)."""
    from sgdm import ops

    try:
        return dict(ops.backend(device_type))
    except Exception as err:  # report, never fail the benchmark over bookkeeping
        return {"unknown": repr(err)}


def worker(args) -> dict:
    import torch

    from sgdm import ops
    from sgdm.models.config import UNetConfig
    from sgdm.models.unet import UNet

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.config == "quickstart":
        cfg, num_classes = _quickstart_unet()
    else:
        cfg, num_classes = UNetConfig(**(SMALL if args.config == "small" else CHURCHES)), NUM_CLASSES
    from sgdm.training.rng import seeded_cpu_rng

    gen = torch.Generator().manual_seed(0)
    with seeded_cpu_rng(0):  # the same weights in every worker: both settings time (and check) one network
        model = UNet(cfg, cond_dim=num_classes).to(device)
    with torch.no_grad():  # non-zero output convs so backward does real work everywhere
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(device) * 0.01)
    if args.compiled:
        from sgdm.models.compile import compile_network

        compile_network(model)  # one graph for the training step, one for sampling (eval, no grad)
    b, s = args.batch, cfg.image_size
    x = torch.randn(b, cfg.in_channels, s, s, generator=gen).to(device)
    t = torch.randint(0, 1000, (b,), generator=gen).to(device)
    cond = torch.nn.functional.one_hot(torch.arange(b) % num_classes, num_classes).float().to(device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16")

    def train_step():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = (model(x, t, cond) - x).square().mean()
        loss.backward()

    def denoise():
        with torch.no_grad(), autocast:
            return model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))

    def sample_step():
        eps_cond, eps_uncond = denoise().float().chunk(2)
        ops.guided_ddim_step(x, eps_cond, 0.5, 0.6, eps_uncond=eps_uncond, guidance_scale=2.0)

    if args.check_file:  # the output the other setting must reproduce (untimed)
        model.eval()
        torch.save(denoise().float().cpu(), args.check_file)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = CLOCKS[args.clock] if device.type == "cpu" else time.perf_counter
    train = _time(train_step, device, args.warmup, args.iters, clock)
    train_peak = _peak_memory_mb(device)
    model.eval()
    sample = _time(sample_step, device, args.warmup, args.iters, clock)
    backends = _backends(device.type)
    return {"train": train, "sample": sample, "peak_mb": max(train_peak, _peak_memory_mb(device)),
            "train_peak_mb": train_peak, "backend": backends,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def _run_setting(args, setting: bool, check_file: str | None = None) -> dict:
    """One worker; ``setting``: the kernels on (``--compare kernels``) or torch.compile on (``--compare compile``);
    ``check_file``: where it saves the UNet's output for :func:`_agreement`."""
    env = dict(os.environ, SGDM_KERNELS="1" if setting or args.compare == "compile" else "0")
    cmd = [sys.executable, __file__, "--worker", "--config", args.config, "--device", args.device,
           "--batch", str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--precision", args.precision, "--threads", str(args.threads), "--clock", args.clock]
    if args.compare == "compile" and setting:
        cmd.append("--compiled")
    if check_file:
        cmd += ["--check-file", check_file]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker ({args.compare}={setting}, SGDM_KERNELS={env['SGDM_KERNELS']}) failed:\n"
                           f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["auto", "small", "quickstart", "churches"], default="auto",
                        help="auto: churches on a GPU, small on the CPU; quickstart: configs/quickstart.yaml's UNet")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch", type=int, default=0, help="default: 4 (small) or 16 (churches)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating kernel/reference subprocess rounds")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="CPU timing clock; 'cpu' (process time) resists machine load, use with "
                             "--threads 1")
    parser.add_argument("--compare", choices=["kernels", "compile"], default="kernels",
                        help="kernels: sgdm kernels vs SGDM_KERNELS=0 (default); compile: torch.compile vs eager")
    parser.add_argument("--json", metavar="PATH", help="also write the results (medians, ratios, every time) here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, low in (("rounds", 1), ("iters", 1), ("warmup", 0), ("batch", 0), ("threads", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name}: expected at least {low}, got {getattr(args, name)}")
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    import torch

    cuda = torch.cuda.is_available()
    args.device = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
    args.config = ("churches" if args.device == "cuda" else "small") if args.config == "auto" else args.config
    args.batch = args.batch or (16 if args.config == "churches" else 4)
    runs = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        checks = {setting: os.path.join(tmp, f"eps_{setting}.pt") for setting in (True, False)}
        for r in range(args.rounds):
            # ABBA order: neither setting always runs first (on a cold GPU, or right after the
            # other has heated the machine)
            for setting in ((True, False) if r % 2 == 0 else (False, True)):
                runs[setting].append(_run_setting(args, setting, checks[setting] if r == 0 else None))
        agreement = _agreement(args, checks)
    result = _report(args, runs)
    result["agreement"] = agreement
    if not agreement["ok"]:
        print(f"MISMATCH UNet output: {agreement['what']} differ by {agreement['rel_error']:.2e} "
              f"(relative L2; tolerance {agreement['tolerance']:.0e}): the times above are not comparable")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if agreement["ok"] else 1


def _agreement(args, checks: dict) -> dict:
    """The two settings' saved UNet outputs compared: ||a - b|| / ||b||, b the reference setting's."""
    import torch

    got, want = (torch.load(checks[setting]).double() for setting in (True, False))
    labels = ("torch.compile", "eager") if args.compare == "compile" else ("kernels", "SGDM_KERNELS=0")
    error = float((got - want).norm() / want.norm().clamp_min(1e-30))
    tolerance = 1e-1 if args.precision == "bf16" else 1e-2
    return {"what": f"{labels[0]} vs {labels[1]}", "rel_error": error, "tolerance": tolerance,
            "ok": error <= tolerance}  # False for NaN


def _report(args, runs) -> dict:
    """Prints the table; returns the same numbers (and every worker's times) for ``--json``."""
    print(f"UNet benchmark: config={args.config} device={args.device} batch={args.batch} precision="
          f"{args.precision} threads={args.threads} clock={args.clock} params={runs[True][0]['params_m']:.1f}M "
          f"(median of {args.iters} iters x {args.rounds} rounds)")
    medians, settings = {}, {}
    labels = ("torch.compile", "eager") if args.compare == "compile" else ("kernels", "SGDM_KERNELS=0")
    for kernels, label in zip((True, False), labels):
        r = runs[kernels]
        train = statistics.median(v for x in r for v in x["train"])
        sample = statistics.median(v for x in r for v in x["sample"])
        peak = max(x["peak_mb"] for x in r)
        medians[kernels] = (train, sample)
        settings[label] = {"train_ms": train * 1e3, "sample_ms": sample * 1e3, "peak_mb": peak,
                           "backend": r[0]["backend"], "rounds": r}
        print(f"  {label:15s} train fwd+bwd {train * 1e3:9.1f} ms   guided DDIM step {sample * 1e3:9.1f} ms   "
              f"peak {peak:8.0f} MiB   backends {r[0]['backend']}")
        per_round = " / ".join(f"{statistics.median(x['train']) * 1e3:.1f}" for x in r)
        print(f"  {'':15s} train median per round: {per_round} ms")
    (tk, sk), (tr, sr) = medians[True], medians[False]
    print(f"  speed-up ({labels[1]} / {labels[0]} time): train {tr / tk:.2f}x   sampling step {sr / sk:.2f}x")
    return {"config": args.config, "device": args.device, "batch": args.batch, "precision": args.precision,
            "threads": args.threads, "clock": args.clock, "compare": args.compare, "iters": args.iters,
            "warmup": args.warmup, "rounds": args.rounds, "params_m": runs[True][0]["params_m"],
            "settings": settings, "speedup": {"train": tr / tk, "sample": sr / sk},
            "speedup_of": f"{labels[1]} / {labels[0]} time"}


if __name__ == "__main__":
    sys.exit(main())
