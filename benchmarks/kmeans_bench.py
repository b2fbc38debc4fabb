"""k-means speed and final inertia: sgdm (torch) vs scikit-learn KMeans vs faiss-cpu, same data, same run.

Data: L2-normalised points around random unit centres (the shape of CLS
features), generated from a seed. sgdm and scikit-learn start from k-means++
(sgdm: on ``--init-points-per-cluster`` x K random points, its default) and
stop at scikit-learn's default tolerance; faiss starts from random centres and
runs at most ``--faiss-iters`` iterations (it stops early once its objective
stops changing). Inertia of every method is recomputed on the same data in
float64 from its centroids. Reported: median wall time over ``--repeats``
(methods interleaved, so machine noise hits all alike), time ratios against
sgdm and inertia ratios against scikit-learn (target: sgdm inertia within 1%
of scikit-learn's, and faster than both on the CPU).

    python benchmarks/kmeans_bench.py --n 50000 --dim 128 --k 100 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def make_data(n: int, dim: int, centres: int, seed: int, noise: float):
    import torch

    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(centres, dim, generator=g), dim=1)
    x = c[torch.randint(centres, (n,), generator=g)] + noise * torch.randn(n, dim, generator=g) / dim**0.5
    return torch.nn.functional.normalize(x, dim=1)


def inertia(x, centroids) -> float:
    from sgdm.annotation.kmeans import assign
    import torch

    _, d = assign(x.double(), torch.as_tensor(centroids).double())
    return float(d.sum())


def run_sgdm(x, k, seed, args):
    import torch

    from sgdm.annotation.kmeans import kmeans

    r = kmeans(x, k, generator=torch.Generator().manual_seed(seed), max_iter=args.max_iter, tol=args.tol,
               init_sample=args.init_points_per_cluster * k)
    return r.centroids, r.n_iter


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--centres", type=int, default=0, help="true centres in the data (default 2k)")
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--faiss-iters", default="25,50", help="comma-separated faiss iteration counts (25: its default)")
    parser.add_argument("--init-points-per-cluster", type=int, default=32,
                        help="sgdm's k-means++ subset (annotation.kmeans.init_points_per_cluster; 0: all points)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="sgdm,sklearn,faiss")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        faiss = None
    x = make_data(args.n, args.dim, args.centres or 2 * args.k, args.seed, args.noise)
    runners = {"sgdm": run_sgdm, "sklearn": run_sklearn}
    for iters in (int(i) for i in args.faiss_iters.split(",")):
        runners[f"faiss@{iters}"] = lambda x, k, seed, args, iters=iters: run_faiss(x, k, seed, args, iters)
    wanted = args.methods.split(",")
    methods = [m for m in runners if m.split("@")[0] in wanted and (faiss is not None or not m.startswith("faiss"))]
    times = {m: [] for m in methods}
    results = {}
    with threadpool_limits(args.threads):
        for rep in range(args.repeats):
            for m in methods:  # interleaved, so machine noise hits every method alike
                start = time.perf_counter()
                centroids, n_iter = runners[m](x, args.k, args.seed + rep, args)
                times[m].append(time.perf_counter() - start)
                results.setdefault(m, []).append((inertia(x, centroids), n_iter))
    summary = {"config": vars(args), "methods": {}}
    base_time = statistics.median(times["sgdm"]) if "sgdm" in times else None
    base_inertia = statistics.median(r[0] for r in results["sklearn"]) if "sklearn" in results else None
    for m in methods:
        t = statistics.median(times[m])
        ine = statistics.median(r[0] for r in results[m])
        row = {"median_s": t, "inertia": ine, "iters": [r[1] for r in results[m]], "times_s": times[m]}
        if base_time:
            row["time_vs_sgdm"] = t / base_time
        if base_inertia:
            row["inertia_vs_sklearn"] = ine / base_inertia
        summary["methods"][m] = row
        print(f"{m:9s} median {t:8.3f} s  x{row.get('time_vs_sgdm', float('nan')):5.2f} of sgdm   "
              f"inertia {ine:12.4f}  ({row.get('inertia_vs_sklearn', float('nan')):.5f} of sklearn)  iters {row['iters']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
