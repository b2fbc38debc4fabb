"""A static HTML gallery of an annotation store: a grid of images per cluster.

Each image is drawn from the (unflipped) dataset the store describes, with its
LOST/ground-truth box outlined or its class map blended over it, and embedded
as an inline PNG, so the page is one self-contained file people can open,
scroll and use to name what each cluster captured. Mask stores are grouped by
each image's largest class. A box store's images with the no-annotation marker
(no ground-truth box after the crop) form their own group, drawn without a box.
"""
from __future__ import annotations

import base64
import html
import io
import pathlib
from collections import defaultdict
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from sgdm.annotation.store import IGNORE, NO_ANNOTATION, AnnotationStore, is_annotated
from sgdm.data.decode import printable

__all__ = ["write_gallery", "render", "missing_ids"]


def _palette(k: int) -> np.ndarray:
    """Distinct colours for ``k`` classes (golden-ratio hues)."""
    import colorsys

    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.85, 0.95)] for i in range(k)], np.uint8)


def _to_pil(image: torch.Tensor, size: int) -> Image.Image:
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array).resize((size, size), Image.BILINEAR)


def render(image: torch.Tensor, record: dict, size: int = 96, num_classes: int = 1) -> Image.Image:
    """Thumbnail of ``image [3, H, W]`` in [-1, 1] with ``record``'s box or mask drawn on it."""
    pil = _to_pil(image, size)
    if "box" in record and is_annotated(record):  # the marker's zero box is no box
        x0, y0, x1, y1 = (float(v) * size for v in record["box"])
        ImageDraw.Draw(pil).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 220, 0), width=2)
    if "mask" in record:
        mask = np.asarray(Image.fromarray(np.asarray(record["mask"], np.uint8)).resize((size, size), Image.NEAREST))
        colours = _palette(max(num_classes, 1))[np.minimum(mask, max(num_classes, 1) - 1)]
        blend = (0.5 * np.asarray(pil, np.float32) + 0.5 * colours).astype(np.uint8)
        blend[mask == IGNORE] = np.asarray(pil)[mask == IGNORE]
        pil = Image.fromarray(blend)
    return pil


def _png(pil: Image.Image) -> str:
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _group(store: AnnotationStore) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for image_id in store.ids:
        record = store.get(image_id)
        if "cluster" in record:
            groups[record["cluster"]].append(image_id)
        else:
            mask = torch.as_tensor(record["mask"]).long().flatten()
            counts = torch.bincount(mask[mask != IGNORE], minlength=store.num_classes)
            groups[int(counts.argmax()) if counts.sum() else IGNORE].append(image_id)
    return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))


def missing_ids(store: AnnotationStore, dataset) -> list[str]:
    """The ids of ``store`` that ``dataset`` does not hold (a dataset other than the one annotated)."""
    ids = set(dataset.ids)
    return [image_id for image_id in store.ids if image_id not in ids]


def write_gallery(store: AnnotationStore, dataset, out: str | pathlib.Path, per_cluster: int = 16,
                  thumb: int = 96, max_clusters: Optional[int] = None) -> pathlib.Path:
    """Write the gallery of ``store`` (images read from ``dataset`` by id) to ``out``; largest clusters first.

    max_clusters: show only the largest N (N >= 1); None shows every cluster. Images without
    annotation (the store's marker) are shown last, as their own group.
    """
    index = {image_id: i for i, image_id in enumerate(dataset.ids)}
    missing = missing_ids(store, dataset)
    if missing:
        raise ValueError(f"gallery: {len(missing)} ids of store {store.path} are not in the dataset "
                         f"(e.g. {printable(missing[0])!r})")
    if max_clusters is not None and max_clusters < 1:
        raise ValueError(f"gallery: max_clusters must be >= 1 or None (all clusters), got {max_clusters}")
    groups = _group(store)
    unannotated = groups.pop(NO_ANNOTATION, None)  # not a cluster: shown last, whatever max_clusters is
    groups = list(groups.items())[:max_clusters] + ([(NO_ANNOTATION, unannotated)] if unannotated else [])
    title = f"{store.path.name}: {store.granularity} annotations, K={store.num_classes}, {len(store)} images"
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif}div.g{display:flex;flex-wrap:wrap;gap:4px}"
             "img{image-rendering:pixelated}figure{margin:0;font-size:10px}</style>",
             f"<h1>{html.escape(title)}</h1><p>method: {html.escape(str(store.method))}</p>"]
    for cluster, ids in groups:
        name = ("no class" if cluster == IGNORE else "no annotation (no ground-truth box)" if cluster == NO_ANNOTATION
                else f"cluster {cluster}")
        count = f"{len(ids)} image{'' if len(ids) == 1 else 's'}"
        parts.append(f"<h2 id='c{cluster}'>{name} ({count})</h2><div class='g'>")
        for image_id in ids[:per_cluster]:
            sample = dataset[index[image_id]]
            if sample is None:
                continue
            pil = render(sample["image"], store.get(image_id), thumb, store.num_classes)
            title = html.escape(printable(image_id))
            parts.append(f"<figure><img src='data:image/png;base64,{_png(pil)}' title='{title}'></figure>")
        parts.append("</div>")
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return out
