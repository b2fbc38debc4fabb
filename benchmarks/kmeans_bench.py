"""k-means speed and final inertia: sgdm (torch) vs scikit-learn KMeans vs faiss-cpu, same data, same run.

Data: L2-normalised points around 2K random unit centres (the shape of CLS
features), generated from a seed. What each library is asked to do:

* sgdm: greedy k-means++ on ``--init-points-per-cluster`` x K random points
  (16, its default), then exact Lloyd steps (Hamerly's bounds skip provably
  unchanged points) until the summed squared centroid shift is below
  ``tol * mean(var(x, 0))`` (``--tol``, scikit-learn's rule), at most ``--max-iter``.
* scikit-learn: ``KMeans(n_init=1, init="k-means++", algorithm="lloyd")``:
  greedy k-means++ on all points, the same tolerance and ``--max-iter``.
* faiss: ``faiss.Kmeans`` with its defaults (random initial centres,
  ``niter=25``; it stops early once its objective stops changing) except
  ``max_points_per_centroid = N``: by default it would train on at most 256
  points per centroid, which is a different (subsampled) problem.

All run single-threaded by default (``--threads``: torch, OpenMP, OpenBLAS via
threadpoolctl, faiss' OpenMP). Inertia of every method is recomputed on the
same data in float64 from its centroids. Reported: median process CPU time
(robust to other load on a shared machine; with one thread it is the work
done) and wall time over ``--repeats``, methods interleaved; time ratios
against sgdm and inertia ratios against scikit-learn (target: sgdm inertia
within 1% of scikit-learn's, and faster than both on the CPU).

    python benchmarks/kmeans_bench.py --n 50000 --dim 128 --k 100 --threads 1

``--device cuda`` (or ``cpu``) runs sgdm alone on that device, on data
generated there, and reports time per phase, iterations, inertia and peak GPU
memory; the paper's ImageNet scale:

    python benchmarks/kmeans_bench.py --device cuda --n 1300000 --dim 768 --k 10000
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

METHODS = ("sgdm", "sklearn", "faiss")


def make_data(n: int, dim: int, centres: int, seed: int, noise: float, device: str = "cpu"):
    """``[n, dim]`` unit rows: random unit centres plus Gaussian noise of norm ~``noise``, normalised
    in place (no extra ``n x dim`` copies: 1.3M x 768 is 4 GB)."""
    import torch

    g = torch.Generator(device).manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(centres, dim, generator=g, device=device), dim=1)
    x = c[torch.randint(centres, (n,), generator=g, device=device)]
    x.add_(torch.randn(n, dim, generator=g, device=device).mul_(noise / dim**0.5))
    return x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True))


def inertia(x, centroids) -> float:
    from sgdm.annotation.kmeans import assign
    import torch

    _, d = assign(x.double(), torch.as_tensor(centroids).double())
    return float(d.sum())


def run_sgdm(x, k, seed, args, log=None):
    import torch

    from sgdm.annotation.kmeans import kmeans

    r = kmeans(x, k, generator=torch.Generator().manual_seed(seed), max_iter=args.max_iter, tol=args.tol,
               init_sample=args.init_points_per_cluster * k, log=log)
    return r.centroids, r.n_iter, r


def run_sklearn(x, k, seed, args):
    from sklearn.cluster import KMeans

    m = KMeans(k, n_init=1, init="k-means++", max_iter=args.max_iter, tol=args.tol, random_state=seed, algorithm="lloyd")
    m.fit(x.numpy())
    return m.cluster_centers_, int(m.n_iter_)


def run_faiss(x, k, seed, args, iters):
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=x.shape[0], verbose=False)
    km.train(x.numpy())
    return km.centroids, len(km.iteration_stats)  # faiss stops early once the objective stops changing


def device_report(args) -> dict:
    """sgdm alone on ``args.device``: phases, iterations, inertia, peak memory (GPU)."""
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kmeans_bench: --device cuda but torch.cuda.is_available() is False")
    cuda = device.type == "cuda"
    start = time.perf_counter()
    x = make_data(args.n, args.dim, args.centres or 2 * args.k, args.seed, args.noise, str(device))
    # warm-up on a slice (CUDA context, cuBLAS handles), so the timed run measures k-means only
    run_sgdm(x[: max(4 * min(args.k, 64), 256)], min(args.k, 64), args.seed, args)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    data_s = time.perf_counter() - start
    start = time.perf_counter()
    _, n_iter, result = run_sgdm(x, args.k, args.seed, args, log=print if args.verbose else None)
    if cuda:
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "n": args.n, "dim": args.dim, "k": args.k, "data_and_warmup_s": data_s, "total_s": total,
        "phases_s": result.seconds, "iterations": n_iter, "max_iter": args.max_iter,
        "inertia": result.inertia, "inertia_per_point": result.inertia / args.n,
        "empty_clusters": int((torch.bincount(result.labels, minlength=args.k) == 0).sum()),
        "data_gib": x.numel() * x.element_size() / 2**30,
    }
    if cuda:
        report["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    phases = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result.seconds.items())
    print(f"sgdm k-means on {report['device']}: N={args.n} D={args.dim} K={args.k}: total {total:.2f} s ({phases}); "
          f"{n_iter} iterations (max {args.max_iter}), inertia {result.inertia:.2f} ({report['inertia_per_point']:.4f} "
          f"per point), {report['empty_clusters']} empty clusters; data {report['data_gib']:.2f} GiB"
          + (f", peak GPU memory {report['peak_gpu_gib']:.2f} GiB" if cuda else ""))
    return report


def compare(args) -> dict:
    """sgdm vs scikit-learn vs faiss on the CPU, interleaved repeats (the table)."""
    import torch
    from threadpoolctl import threadpool_limits

    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(METHODS))
    if unknown or not wanted:
        raise SystemExit(f"kmeans_bench: --methods: unknown {unknown} (choose from {','.join(METHODS)})")
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        faiss = None
        if wanted == ["faiss"]:
            raise SystemExit("kmeans_bench: --methods faiss: faiss is not installed (pip install faiss-cpu)")
        if "faiss" in wanted:
            print("kmeans_bench: faiss is not installed (pip install faiss-cpu, the 'bench' extra): "
                  "its rows are left out", file=sys.stderr)
            wanted.remove("faiss")
    x = make_data(args.n, args.dim, args.centres or 2 * args.k, args.seed, args.noise)
    runners = {"sgdm": lambda x, k, seed, args: run_sgdm(x, k, seed, args)[:2], "sklearn": run_sklearn}
    for iters in (int(i) for i in args.faiss_iters.split(",")):
        runners[f"faiss@{iters}"] = lambda x, k, seed, args, iters=iters: run_faiss(x, k, seed, args, iters)
    methods = [m for m in runners if m.split("@")[0] in wanted]
    times = {m: [] for m in methods}  # process CPU seconds: robust to other load on a shared machine
    walls = {m: [] for m in methods}
    results = {}
    with threadpool_limits(args.threads):
        # untimed warm-up of every method on a slice: imports (scikit-learn's took ~1.6 s of CPU
        # inside the first timed run), thread pools and first-call costs stay out of the medians
        k_warm = min(args.k, 16)
        for m in methods:
            runners[m](x[: min(args.n, 64 * k_warm)], k_warm, args.seed, args)
        for rep in range(args.repeats):
            for m in methods:  # interleaved, so machine noise hits every method alike
                start, start_cpu = time.perf_counter(), time.process_time()
                centroids, n_iter = runners[m](x, args.k, args.seed + rep, args)
                times[m].append(time.process_time() - start_cpu)
                walls[m].append(time.perf_counter() - start)
                results.setdefault(m, []).append((inertia(x, centroids), n_iter))
    summary = {"config": vars(args), "threads": torch.get_num_threads(), "load_avg": os.getloadavg(), "methods": {}}
    base_time = statistics.median(times["sgdm"]) if "sgdm" in times else None
    base_inertia = statistics.median(r[0] for r in results["sklearn"]) if "sklearn" in results else None
    print(f"N={args.n} D={args.dim} K={args.k}, {args.threads} thread(s), {args.repeats} repeats, "
          f"load average {summary['load_avg'][0]:.2f}")
    for m in methods:
        t = statistics.median(times[m])
        ine = statistics.median(r[0] for r in results[m])
        row = {"median_cpu_s": t, "median_wall_s": statistics.median(walls[m]), "inertia": ine,
               "iters": [r[1] for r in results[m]], "cpu_s": times[m], "wall_s": walls[m]}
        if base_time:
            row["time_vs_sgdm"] = t / base_time
        if base_inertia:
            row["inertia_vs_sklearn"] = ine / base_inertia
        summary["methods"][m] = row
        print(f"{m:9s} cpu {t:8.3f} s (wall {row['median_wall_s']:7.3f})  x{row.get('time_vs_sgdm', float('nan')):5.2f} "
              f"of sgdm   inertia {ine:12.4f}  ({row.get('inertia_vs_sklearn', float('nan')):.5f} of sklearn)  "
              f"iters {row['iters']}")
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--centres", type=int, default=0, help="true centres in the data (default 2k)")
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--max-iter", type=int, default=None,
                        help="default 300 (scikit-learn's) for the comparison, 100 (annotation.kmeans.max_iter) with --device")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--faiss-iters", default="25,50", help="comma-separated faiss iteration counts (25: its default)")
    parser.add_argument("--init-points-per-cluster", type=int, default=16,
                        help="sgdm's k-means++ subset (annotation.kmeans.init_points_per_cluster; 0: all points)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated, of " + ",".join(METHODS) + " (faiss: left out with a message when "
                             "faiss-cpu is not installed)")
    parser.add_argument("--device", default=None, help="cpu or cuda: sgdm alone on this device, time per phase")
    parser.add_argument("--verbose", action="store_true", help="with --device: one line per Lloyd iteration")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for name, low in (("n", 1), ("dim", 1), ("k", 1), ("repeats", 1), ("threads", 1), ("centres", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name}: expected at least {low}, got {getattr(args, name)}")
    if args.max_iter is None:
        args.max_iter = 100 if args.device else 300
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    summary = device_report(args) if args.device else compare(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
