"""Training throughput of the full Lightning trainer: sgdm kernels vs ``SGDM_KERNELS=0`` (``--compare
kernels``, the default), the denoiser under ``torch.compile`` vs eager, both with the kernels
(``--compare compile``: ``train.compile``; the compile itself falls in the ``--warmup`` steps), or this
source tree vs another checkout of sgdm (``--compare tree --baseline-tree PATH``: a change's effect), same run.

Each (config, setting) runs ``sgdm.training.run.train`` in its own subprocess (the extension
loads once per process); settings alternate over ``--rounds`` in ABBA order so machine load hits both alike.
Reported per setting: median optimiser steps/s and images/s over the steps after ``--warmup``
(each step timed at the trainer's batch end, CUDA synchronised), peak memory (CUDA allocator peak on
GPU, max RSS on CPU), and the ratio of the two settings' throughputs measured in the same run.

Configs: ``small`` = configs/shapes_cpu.yaml on the CPU (real shapes images, random first stage);
``churches`` = configs/lsun_churches.yaml on one GPU (synthetic 256 px images, since LSUN is not
bundled; ``--churches-batch`` images per step, bf16-mixed). Checkpoints, logging and sample grids are
off so the numbers are the training step itself (data loading, first-stage encode, UNet fwd/bwd, AdamW,
EMA). ``--cache-latents`` trains from latents encoded once before the timed steps, as the quickstart does
(``train.cache_latents``): no first-stage encode in the step. ``--clock cpu`` times each step in process CPU
time, which a machine loaded by other work inflates far less than wall time (meaningful with one thread:
``OMP_NUM_THREADS=1``).

    python benchmarks/train_bench.py                      # small on CPU; + churches when CUDA is present
    python benchmarks/train_bench.py --configs small --steps 30 --json out.json
    python benchmarks/train_bench.py --compare compile --configs small --steps 40 --warmup 10
    OMP_NUM_THREADS=1 python benchmarks/train_bench.py --compare tree --baseline-tree /tmp/old --cache-latents \
        --clock cpu --rounds 4        # the quickstart's step, this tree vs a checkout of the start commit
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _overrides(name: str, steps: int, run_dir: str, churches_batch: int, compile: bool = False,
               cache_latents: bool = False) -> list[str]:
    common = [f"train.compile={str(compile).lower()}", f"run.dir={run_dir}", f"train.max_steps={steps}", "train.checkpoint_every=1000000",
              "train.logger=none", "train.progress_bar=false", "train.sample_every=0",
              "train.export_pipeline=false", f"train.cache_latents={str(cache_latents).lower()}",
              "model.autoencoder.checkpoint=null",
              "prepare.dataset=false", "prepare.autoencoder=false", "prepare.annotations=false",
              "model.guidance.drop_prob=0.1"]
    if name == "small":
        return common + [f"data.shapes.cache_dir={run_dir}/shapes", "data.shapes.num_images=512",
                         "train.accelerator=cpu"]
    return common + ["train.devices=1", "train.strategy=auto", "train.accumulate=1",
                     f"train.batch_size={churches_batch}", "train.accelerator=gpu", "data.num_workers=4"]


class _Synthetic:
    """Fixed-seed random images in [-1, 1] with ids (LSUN is not bundled); picklable for workers."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, self.size, self.size, generator=g) * 2 - 1, "id": f"synthetic/{i}",
                "flipped": False}


def _label_store(cfg, ids) -> None:
    import torch

    from sgdm.annotation.store import write_store

    k = cfg.model.guidance.num_classes
    write_store(cfg.annotation.store, ids, {"cluster": torch.arange(len(ids)) % k}, granularity="label",
                num_classes=k)


def worker(args) -> None:
    import pytorch_lightning as pl
    import torch

    from sgdm.config.schema import load_experiment
    from sgdm.training import data as training_data
    from sgdm.training.run import train

    cfg_path = ROOT / "configs" / ("shapes_cpu.yaml" if args.config == "small" else "lsun_churches.yaml")
    overrides = _overrides(args.config, args.steps, args.run_dir, args.churches_batch, args.compiled,
                           args.cache_latents)
    overrides += [f"annotation.store={args.run_dir}/store", "annotation.source=self", "model.guidance.source=self"]
    cfg = load_experiment(cfg_path, overrides)
    if args.config == "churches":
        synthetic = _Synthetic(max(4 * cfg.train.batch_size, 256), cfg.data.size)
        training_data.build_image_dataset = lambda data_cfg, seed: synthetic  # noqa: E731
        dataset = synthetic
    else:
        dataset = training_data.build_image_dataset(cfg.data, 0)
    _label_store(cfg, [dataset[i]["id"] for i in range(len(dataset))])
    cuda = cfg.train.accelerator in ("gpu", "cuda")
    clock = time.process_time if args.clock == "cpu" and not cuda else time.perf_counter

    class Timer(pl.Callback):
        def __init__(self):
            self.stamps = []

        def on_train_batch_end(self, *a):
            if cuda:
                torch.cuda.synchronize()
            self.stamps.append(clock())

    timer = Timer()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    assert train(cfg, callbacks=[timer]) == 0
    dts = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])][args.warmup:]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import sgdm
    from sgdm import ops

    step_s = statistics.median(dts)
    print("RESULT " + json.dumps({"config": args.config, "kernels": os.environ.get("SGDM_KERNELS", "1") != "0",
                                  "compile": args.compiled, "tree": str(pathlib.Path(sgdm.__file__).parents[1]),
                                  "cache_latents": args.cache_latents, "clock": args.clock,
                                  "steps_per_s": 1 / step_s, "images_per_s": cfg.train.batch_size / step_s,
                                  "batch_size": cfg.train.batch_size, "timed_steps": len(dts),
                                  "peak_memory_mb": peak, "device": "cuda" if cuda else "cpu",
                                  "backends": ops.backend("cuda" if cuda else "cpu")}), flush=True)


def _run(config: str, setting: bool, args) -> dict:
    """One run; ``setting``: the kernels on (``--compare kernels``), torch.compile on (``--compare compile``)
    or this tree rather than ``--baseline-tree`` (``--compare tree``)."""
    kernels = setting or args.compare != "kernels"
    tree = ROOT if setting or args.compare != "tree" else args.baseline_tree
    env = {**os.environ, "SGDM_KERNELS": "1" if kernels else "0", "PYTHONPATH": str(tree)}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--worker", "--config", config, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--run-dir", tmp, "--churches-batch", str(args.churches_batch),
               "--clock", args.clock] + (["--cache-latents"] if args.cache_latents else [])
        if args.compare == "compile" and setting:
            cmd.append("--compiled")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{config} ({args.compare}={setting}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=("small", "churches"), default=None,
                   help="default: small, plus churches when CUDA is available")
    p.add_argument("--steps", type=int, default=25, help="optimiser steps per run (default 25)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median (default 5)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds per setting (default 1)")
    p.add_argument("--churches-batch", type=int, default=32, help="images per step for churches (default 32)")
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    p.add_argument("--compare", choices=("kernels", "compile", "tree"), default="kernels",
                   help="kernels: sgdm kernels vs SGDM_KERNELS=0 (default); compile: train.compile vs eager; "
                        "tree: this source tree vs --baseline-tree")
    p.add_argument("--baseline-tree", type=pathlib.Path, default=None,
                   help="with --compare tree: another sgdm checkout (its sgdm/ with the built extension) to time "
                        "against this one")
    p.add_argument("--cache-latents", action="store_true",
                   help="train from latents cached before the timed steps (train.cache_latents, as the quickstart)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU step timing: wall time (default) or process CPU time (resists a loaded machine; "
                        "use with OMP_NUM_THREADS=1)")
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default="small", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, low in (("rounds", 1), ("warmup", 0), ("churches_batch", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')}: expected at least {low}, got {getattr(args, name)}")
    if args.steps <= args.warmup + 1:
        p.error(f"--steps {args.steps} leaves no timed steps after --warmup {args.warmup}")
    if (args.compare == "tree") != (args.baseline_tree is not None):
        p.error("--baseline-tree: needed with --compare tree, and only there")
    if args.baseline_tree is not None and not (args.baseline_tree / "sgdm" / "__init__.py").is_file():
        p.error(f"--baseline-tree: {args.baseline_tree} holds no sgdm/ package")
    if args.worker:
        worker(args)
        return 0
    configs = args.configs
    if configs is None:
        import torch

        configs = ["small"] + (["churches"] if torch.cuda.is_available() else [])
    results = []
    for config in configs:
        runs = {True: [], False: []}
        for r in range(args.rounds):
            # ABBA order, as in unet_bench: the kernels (or compile) do not always run first (on a cold
            # machine, or right after the other setting has loaded it)
            for setting in ((True, False) if r % 2 == 0 else (False, True)):
                runs[setting].append(_run(config, setting, args))
        for setting, rs in runs.items():
            best = dict(rs[0], steps_per_s=statistics.median(r["steps_per_s"] for r in rs),
                        images_per_s=statistics.median(r["images_per_s"] for r in rs),
                        peak_memory_mb=max(r["peak_memory_mb"] for r in rs),
                        steps_per_s_per_round=[r["steps_per_s"] for r in rs])
            results.append(best)
        k, ref = results[-2], results[-1]
        k["speedup"] = k["steps_per_s"] / ref["steps_per_s"]
    print(f"{'config':10s} {'kernels':8s} {'compile':8s} {'device':6s} {'batch':>5s} {'steps/s':>9s} "
          f"{'images/s':>9s} {'peak MB':>9s} {'speedup':>8s}  tree (clock {args.clock}"
          f"{', cached latents' if args.cache_latents else ''})")
    for r in results:
        print(f"{r['config']:10s} {str(r['kernels']):8s} {str(r['compile']):8s} {r['device']:6s} {r['batch_size']:5d} "
              f"{r['steps_per_s']:9.3f} {r['images_per_s']:9.2f} {r['peak_memory_mb']:9.0f} "
              f"{r.get('speedup', 1.0):8.3f}  {r['tree']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
