"""``write_report(cfg, run_dir)``: HTML + Markdown report of a trained self-guided run.

Contents: one sample row per cluster (label guidance; columns share their
noise, so a column shows one seed under every cluster), a guidance-scale row
per w in ``prepare.report_scales`` (same noise, paper Eq. 4), box-guided and
mask-guided samples (from the companion runs, with the guiding layout drawn
next to each sample), and the metrics: the Frechet distance in the
self-supervised feature space at w = 0 (unguided) and at the sampling w, the
layout adherence of the companions, and the annotation scores from the stores.

Every file is written atomically (a temporary file beside it, then a rename), so
a report directory never holds a half-written page or image; the section images
a regenerated report no longer shows (companions switched off, another guidance
kind) are removed, and only those (:data:`SECTION_IMAGES`).
"""
from __future__ import annotations

import dataclasses
import html
import json
import pathlib
import sys
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["write_report", "SECTION_IMAGES"]

PALETTE = torch.tensor([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                        [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
                        [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195]]) / 255.0


def _layout_image(kind: str) -> str:
    return f"{kind}-guided.png"


# every image a section of the report can show: the files the report owns in its directory
SECTION_IMAGES = ("clusters.png", "scales.png", _layout_image("box"), _layout_image("mask"))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def save_grid(images: torch.Tensor, per_row: int, path: pathlib.Path, cell: int = 64) -> pathlib.Path:
    """images [N, 3, H, W] in [0, 1] -> PNG grid, each image scaled to ``cell`` px (nearest), written atomically."""
    from PIL import Image

    from sgdm.atomic import atomic_open

    n = images.shape[0]
    rows = (n + per_row - 1) // per_row
    x = F.interpolate(images.float(), size=(cell, cell), mode="nearest")
    canvas = torch.ones(3, rows * (cell + 2), per_row * (cell + 2))
    for i in range(n):
        r, c = divmod(i, per_row)
        canvas[:, r * (cell + 2): r * (cell + 2) + cell, c * (cell + 2): c * (cell + 2) + cell] = x[i]
    pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_open(path, "wb") as fh:
        Image.fromarray(pixels).save(fh, format="PNG")
    return path


def draw_boxes(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Copy of images [N, 3, H, W] with normalised xyxy ``boxes`` [N, 4] outlined in red."""
    out = images.clone()
    _, _, h, w = images.shape
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)
    for img, (x0, y0, x1, y1) in zip(out, boxes.tolist()):
        c0, c1 = int(x0 * (w - 1)), int(round(x1 * (w - 1)))
        r0, r1 = int(y0 * (h - 1)), int(round(y1 * (h - 1)))
        img[:, r0, c0:c1 + 1] = red
        img[:, r1, c0:c1 + 1] = red
        img[:, r0:r1 + 1, c0] = red
        img[:, r0:r1 + 1, c1] = red
    return out


def colour_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class maps [N, h, w] (255 = ignore, shown black) -> colour images [N, 3, H, W]."""
    m = masks.long()
    colours = PALETTE[m.clamp(max=254) % len(PALETTE)] * (m != 255)[..., None]
    return F.interpolate(colours.permute(0, 3, 1, 2), size=size, mode="nearest")


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([a, b], 1).flatten(0, 1)


def _column_generators(per_row: int, rows: int, seed: int) -> list[torch.Generator]:
    # One seed per column: every row of a column starts from the same noise.
    return [torch.Generator().manual_seed(seed + c) for _ in range(rows) for c in range(per_row)]


def _sample_kwargs(cfg) -> dict:
    p = cfg.prepare
    return dict(num_steps=p.report_steps, sampler=cfg.sampler.sampler, eta=cfg.sampler.eta, output_type="pt",
                progress=False, batch_size=cfg.eval.batch_size)


_LABELS = {"self": "self-labeled guidance", "gt": "ground-truth labels"}  # model.guidance.source


def _label_sections(cfg, pipe, out: pathlib.Path) -> list[dict]:
    """One row per cluster at the sampling w, then one row per w in report_scales."""
    p, k = cfg.prepare, cfg.model.guidance.num_classes
    per_row, seed, w = p.report_samples_per_row, cfg.run.seed, cfg.sampler.guidance_scale
    clusters = [c for c in range(k) for _ in range(per_row)]
    images = pipe(len(clusters), cluster=clusters, guidance_scale=w, generator=_column_generators(per_row, k, seed),
                  **_sample_kwargs(cfg))
    sections = [dict(title="One row per cluster", image=save_grid(images, per_row, out / "clusters.png").name,
                     caption=f"Rows: clusters 0..{k - 1} ({_LABELS[cfg.model.guidance.source]}), w = {w}; columns share "
                             "their noise.")]
    rows = []
    for scale in p.report_scales:
        rows.append(pipe(per_row, cluster=[c % k for c in range(per_row)], guidance_scale=scale,
                         generator=_column_generators(per_row, 1, seed), **_sample_kwargs(cfg)))
    sections.append(dict(title="Guidance scale", image=save_grid(torch.cat(rows), per_row, out / "scales.png").name,
                         caption="Rows: w = " + ", ".join(f"{s:g}" for s in p.report_scales)
                         + " (paper Eq. 4; w = 0 is unconditional); column c is guided by cluster c mod K."))
    return sections


def _layout_section(vcfg, pipe, out: pathlib.Path, n: int) -> dict:
    """Samples guided by boxes / masks drawn from the variant's store, each next to its guide."""
    from sgdm.evaluation.conditions import draw_conditions

    kind = vcfg.model.guidance.kind
    conds = draw_conditions(kind, vcfg.annotation.store, n, torch.Generator().manual_seed(vcfg.run.seed))
    images = pipe(n, guidance_scale=vcfg.sampler.guidance_scale, generator=torch.Generator().manual_seed(vcfg.run.seed),
                  **conds.pipeline_kwargs(), **_sample_kwargs(vcfg))
    if kind == "box":
        guides = draw_boxes(torch.zeros_like(images) + 0.5, conds.boxes)
        shown = draw_boxes(images, conds.boxes)
    else:
        guides, shown = colour_masks(conds.masks, tuple(images.shape[-2:])), images
    name = _layout_image(kind)
    save_grid(_interleave(guides, shown), 2 * min(n, 4), out / name)
    what = "box (red; its cluster id is guidance too)" if kind == "box" else "self-segmented class map"
    return dict(title=f"{kind.capitalize()}-guided samples", image=name,
                caption=f"Pairs: the guiding {what}, then the sample (w = {vcfg.sampler.guidance_scale}).")


def _evaluate(run_dir: pathlib.Path, cfg, scales: list[float], log, out_dir: pathlib.Path) -> list[dict]:
    """fd_<encoder> (and adherence; FID/IS/KID when eval.inception_weights is set) on report_eval_n samples,
    written to ``out_dir`` (not the run's eval/, where a full `sgdm-ldm eval` keeps its results)."""
    from sgdm.evaluation.evaluate import evaluate_run

    p = cfg.prepare
    metrics = ["fd", "adherence"] + (["fid", "is", "kid"] if cfg.eval.inception_weights is not None else [])
    ecfg = dataclasses.replace(cfg.eval, n=p.report_eval_n, batch_size=min(cfg.eval.batch_size, p.report_eval_n),
                               steps=p.report_steps, sweep_scales=scales, metrics=metrics)
    return evaluate_run(run_dir, ecfg, log, out_dir=out_dir)["results"]


def _companion(cfg, run_dir: pathlib.Path, kind: str):
    from sgdm.quickstart.variants import guidance_variant

    p, a = cfg.prepare, cfg.annotation
    classes = a.lost.num_clusters if kind == "box" else (p.companion_mask_classes or a.num_classes)
    return guidance_variant(cfg, kind, "self", classes=classes, store_root=a.store.parent, run_dir=run_dir / "companions",
                            run_name=kind, max_steps=p.companion_steps)


def _annotation_scores(store: pathlib.Path) -> dict:
    manifest = pathlib.Path(store) / "manifest.json"
    if not manifest.is_file():
        return {}
    return json.loads(manifest.read_text()).get("metrics") or {}


def write_report(cfg, run_dir: str | pathlib.Path, log: Callable[[str], None] = _stderr) -> pathlib.Path:
    """Write ``<run_dir>/report/index.html`` and ``report.md`` (+ PNGs); returns the report directory."""
    from sgdm.pipeline import SelfGuidedPipeline
    from sgdm.quickstart.variants import train_variant

    run_dir = pathlib.Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    pipe = SelfGuidedPipeline.from_pretrained(run_dir / "pipeline")
    kind, w = cfg.model.guidance.kind, cfg.sampler.guidance_scale
    sections = _label_sections(cfg, pipe, out) if kind == "label" else []
    if kind in ("box", "mask"):
        sections.append(_layout_section(cfg, pipe, out, 8))
    scales = [] if kind == "none" else list(dict.fromkeys([0.0, w]))  # w = 0 is the unguided row already
    metrics = [{"model": f"{cfg.run.name} ({kind})", **r} for r in _evaluate(run_dir, cfg, scales, log, out / "eval")]
    scores = {f"{kind} store": _annotation_scores(cfg.annotation.store)} if kind != "none" else {}
    for extra in ("box", "mask") if cfg.prepare.report_companions else ():
        if extra == kind:
            continue
        vcfg = _companion(cfg, run_dir, extra)
        vdir = train_variant(vcfg, log)
        sections.append(_layout_section(vcfg, SelfGuidedPipeline.from_pretrained(vdir / "pipeline"), out, 8))
        metrics += [{"model": f"companion ({extra})", **r} for r in _evaluate(vdir, vcfg, [w], log, out / f"eval-{extra}")]
        scores[f"{extra} store"] = _annotation_scores(vcfg.annotation.store)
    _write_markdown(out / "report.md", cfg, sections, metrics, scores)
    _write_html(out / "index.html", cfg, sections, metrics, scores)
    shown = {s["image"] for s in sections}
    for name in SECTION_IMAGES:  # an earlier report's sections that this one does not have
        if name not in shown:
            (out / name).unlink(missing_ok=True)
    log(f"report: {out / 'index.html'}")
    return out


def _intro(cfg) -> str:
    return (f"Run `{cfg.run.name}`: {cfg.model.guidance.source}-{cfg.model.guidance.kind} guidance on "
            f"`{cfg.data.dataset}` ({cfg.data.size}px), {cfg.train.max_steps} training steps, sampled with "
            f"{cfg.sampler.sampler} {cfg.prepare.report_steps} steps and EMA weights. `fd_<name>` is the Frechet "
            "distance in that encoder's feature space (lower is better; not FID).")


def _write_markdown(path: pathlib.Path, cfg, sections, metrics, scores) -> None:
    from sgdm.evaluation.evaluate import markdown_table
    from sgdm.atomic import atomic_write_text

    lines = [f"# sgdm report: {cfg.run.name}", "", _intro(cfg), ""]
    for s in sections:
        lines += [f"## {s['title']}", "", f"![{s['title']}]({s['image']})", "", s["caption"], ""]
    lines += ["## Metrics", "", markdown_table(metrics)]
    for name, values in scores.items():
        if values:
            lines += [f"Annotation scores ({name}): " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()), ""]
    atomic_write_text(path, "\n".join(lines))


def _write_html(path: pathlib.Path, cfg, sections, metrics, scores) -> None:
    from sgdm.atomic import atomic_write_text

    esc = html.escape
    keys = list(dict.fromkeys(k for r in metrics for k in r))
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else esc(str(v)))  # noqa: E731
    table = "<tr>" + "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{fmt(r.get(k))}</td>" for k in keys) + "</tr>" for r in metrics)
    body = [f"<h1>sgdm report: {esc(cfg.run.name)}</h1>", f"<p>{esc(_intro(cfg))}</p>"]
    for s in sections:
        body += [f"<h2>{esc(s['title'])}</h2>", f"<img src=\"{esc(s['image'])}\" alt=\"{esc(s['title'])}\">",
                 f"<p>{esc(s['caption'])}</p>"]
    body += ["<h2>Metrics</h2>", f"<table border=1 cellpadding=4>{table}</table>"]
    for name, values in scores.items():
        if values:
            body.append(f"<p>Annotation scores ({esc(name)}): "
                        + ", ".join(f"{esc(k)} {v:.3f}" for k, v in values.items()) + "</p>")
    atomic_write_text(path, "<!doctype html><html><head><meta charset=utf-8><title>sgdm report</title>"
                            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
                            "img{image-rendering:pixelated}"
                            "</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
