"""Dense CRF per image: exact messages (O(N^2) in the N grid cells) vs the permutohedral lattice
(O(N)), ``annotation.stego.crf.method: exact | lattice``, and how often their labels agree.

Input per grid side: a structured image (a half, a disc and a band of colour, slight noise) and
class probabilities that follow its regions under heavy noise (``tests/annotation/test_crf.py``'s
``structured_inputs``); STEGO's default kernels with widths scaled as a ``--image-side`` pixel image
on that grid and its block of the exact kernel (``Segmenter.refine``'s rules). Reported per side and method: median process CPU time
and wall time over ``--repeats`` (methods interleaved, after one untimed call of each; on CUDA the
device is synchronised inside the timed region), the lattice/exact time ratio, the fraction
of cells whose labels agree with the exact path, and each one's accuracy against the regions;
``--json PATH`` writes the same rows.

    OMP_NUM_THREADS=1 python benchmarks/crf_bench.py --sides 32 64 128 --exact-max-side 64 --threads 1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "annotation"))
from test_crf import structured_inputs  # noqa: E402

from sgdm.annotation.config import CRFConfig  # noqa: E402
from sgdm.annotation.crf import dense_crf, scaled  # noqa: E402


def timed(fn, sync=None):
    """(fn(), CPU seconds, wall seconds); ``sync`` (the device's synchronize) runs before the clocks
    stop, so that asynchronous CUDA work is inside the measurement."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if sync is not None:
        sync()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--exact-max-side", type=int, default=64, help="the exact path only up to this side")
    parser.add_argument("--image-side", type=int, default=0,
                        help="pixels of the image the grid was drawn from (0: 4x the side, as the default "
                             "64-cell masks of 256-px images)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the rows here")
    args = parser.parse_args(argv)
    for name, low in (("repeats", 1), ("threads", 1), ("image_side", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')}: expected at least {low}, got {getattr(args, name)}")
    if min(args.sides) < 1:
        parser.error(f"--sides: expected grid sides >= 1, got {args.sides}")
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else None
    rows = []
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}")
    print("side | image px | method | CPU s median | wall s median | lattice/exact wall | agree with exact | accuracy")
    for side in args.sides:
        image, probs, truth = structured_inputs(side)
        image, probs = image.to(args.device), probs.to(args.device)
        image_side = args.image_side or 4 * side
        params = scaled(CRFConfig(), side / image_side)
        block = max(1, (1 << 24) // (side * side))  # Segmenter.refine's default chunk_elements
        methods = ["exact", "lattice"] if side <= args.exact_max_side else ["lattice"]
        times = {m: ([], []) for m in methods}
        labels = {}
        for method in methods:  # untimed: first-call costs (allocations, thread pools, CUDA context)
            dense_crf(image, probs, dataclasses.replace(params, method=method), block)
        for _ in range(args.repeats):
            for method in methods:
                run = dataclasses.replace(params, method=method)
                out, cpu, wall = timed(lambda: dense_crf(image, probs, run, block).argmax(0), sync)
                times[method][0].append(cpu)
                times[method][1].append(wall)
                labels[method] = out.cpu()
        for method in methods:
            cpu, wall = (statistics.median(t) for t in times[method])
            ratio = agree = None
            if "exact" in labels:
                ratio = wall / statistics.median(times["exact"][1])
                agree = float((labels[method] == labels["exact"]).float().mean())
            accuracy = float((labels[method] == truth).float().mean())
            rows.append({"side": side, "image_side": image_side, "method": method, "median_cpu_s": cpu,
                         "median_wall_s": wall, "lattice_over_exact_wall": ratio, "agree_with_exact": agree,
                         "accuracy": accuracy})
            print(f"{side} | {image_side} | {method} | {cpu:.4f} | {wall:.4f} | "
                  f"{'' if ratio is None else f'{ratio:.4f}'} | {'' if agree is None else f'{agree:.4f}'} | "
                  f"{accuracy:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "device": args.device,
                       "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
