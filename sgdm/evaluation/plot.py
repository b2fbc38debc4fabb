"""Metric-versus-guidance-scale plot for ``eval --sweep-scale``."""
from __future__ import annotations

import pathlib

__all__ = ["plot_sweep"]


def plot_sweep(results: list[dict], metrics: list[str], path: str | pathlib.Path) -> pathlib.Path:
    """One panel per metric, the metric against the guidance scale w (paper Eq. 4), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(m in r for r in results)]
    if not metrics:
        raise ValueError("plot_sweep: no metric to plot")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        points = sorted((r["guidance_scale"], r[metric]) for r in results if metric in r)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_xlabel("guidance scale w")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    from sgdm.atomic import atomic_path

    path = pathlib.Path(path)
    try:
        with atomic_path(path) as tmp:  # a plot is there whole or not at all
            fig.savefig(tmp, dpi=100, format=path.suffix[1:] or "png")  # the name's own format
    finally:
        plt.close(fig)
    return path
