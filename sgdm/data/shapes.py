"""``shapes``: a procedural dataset that needs no download.

Each image has a textured background (stripes, checkerboard, smooth blobs or
a gradient, in two low-saturation tints plus grain) and 1 to 3 non-overlapping
objects. An object's class is (shape, colour): 4 shapes x 3 saturated colours
= 12 classes, so ``class_names[c] = f"{colour} {shape}"``. Ground truth:

- ``gt_label``: class of the object with the largest visible area,
- ``gt_boxes`` / ``gt_box_labels``: the tight box of each object's mask,
- ``gt_mask``: class id + 1 per pixel (0 = background).

Edges are antialiased from signed distance functions (alpha = clip(0.5 - d, 0, 1)
with d in pixels); the mask is ``alpha >= 0.5``.

Generation is vectorised in chunks of :data:`CHUNK` images, each drawn from
``SeedSequence([seed, split, chunk])``, so image i does not depend on how many
images are generated. Results are cached as ``.npy`` files (memory-mapped by
every DataLoader worker) in a directory keyed by all parameters.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from sgdm.data.base import ImageDataset, RawSample

VERSION = 2  # bump when generation changes, so stale caches are never reused
CHUNK = 256
MAX_OBJECTS = 3
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (215, 35, 35), "green": (30, 170, 55), "blue": (40, 70, 215)}
CLASS_NAMES = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS)
_SPLIT_CODE = {"train": 0, "val": 1}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SGDM_CACHE", Path.home() / ".cache" / "sgdm"))


def generate(num_images: int, image_size: int = 64, seed: int = 0, split: str = "train") -> dict[str, np.ndarray]:
    """Generate ``num_images`` images deterministically.

    Returns ``images`` uint8 [N, S, S, 3], ``masks`` uint8 [N, S, S] (class + 1),
    ``boxes`` float32 [N, 3, 4] xyxy pixels, ``box_labels`` int16 [N, 3] (-1 = no
    object in that slot), ``labels`` int16 [N].
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODE)}, got {split!r}")
    chunks = [_chunk(image_size, seed, _SPLIT_CODE[split], c) for c in range((num_images + CHUNK - 1) // CHUNK)]
    return {key: np.concatenate([c[key] for c in chunks])[:num_images] for key in chunks[0]}


def _chunk(size: int, seed: int, split_code: int, chunk: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_code, chunk, VERSION]))
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    image = _background(rng, CHUNK, size, xx, yy)
    owner = np.full((CHUNK, size, size), -1, dtype=np.int8)
    classes = np.full((CHUNK, MAX_OBJECTS), -1, dtype=np.int16)
    for slot, (active, cls, params) in enumerate(_layout(rng, CHUNK, size)):
        alpha = _shape_alpha(params, xx, yy) * active[:, None, None]
        colour = _object_colour(rng, cls, params, xx, yy)
        image += (colour - image) * alpha[..., None]
        owner[alpha >= 0.5] = slot
        classes[:, slot] = np.where(active, cls, -1)
    boxes, areas = _boxes_from_owner(owner)
    classes = np.where(areas > 0, classes, -1).astype(np.int16)
    slot_class = np.concatenate([classes, np.full((CHUNK, 1), -1, np.int16)], axis=1)
    masks = (np.take_along_axis(slot_class, owner.reshape(CHUNK, -1).astype(np.int64), axis=1) + 1)
    labels = np.take_along_axis(classes, np.argmax(areas, axis=1)[:, None], axis=1)[:, 0]
    return {
        "images": np.clip(np.rint(image), 0, 255).astype(np.uint8),
        "masks": masks.reshape(CHUNK, size, size).astype(np.uint8),
        "boxes": np.where(classes[..., None] >= 0, boxes, 0.0).astype(np.float32),
        "box_labels": classes,
        "labels": labels.astype(np.int16),
    }


def _background(rng, n: int, size: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Float32 [n, S, S, 3]: two low-saturation tints mixed by one of four patterns, plus grain."""
    theta = rng.uniform(0, np.pi, n).astype(np.float32)[:, None, None]
    freq = (2 * np.pi * rng.uniform(2.0, 7.0, n) / size).astype(np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)[:, None, None]
    offset = rng.uniform(0.2, 0.8, n).astype(np.float32)[:, None, None]
    grid = rng.uniform(0, 1, (n, 5, 5)).astype(np.float32)
    kind = rng.integers(0, 4, n)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    pattern = np.empty((n, size, size), dtype=np.float32)
    for k, pick in enumerate(kind == k for k in range(4)):  # each image computes only its own pattern
        if not pick.any():
            continue
        if k == 0:  # stripes
            pattern[pick] = 0.5 + 0.5 * np.sin(freq[pick] * u[pick] + phase[pick])
        elif k == 1:  # (rotated) checkerboard, soft edges
            v = -xx * np.sin(theta[pick]) + yy * np.cos(theta[pick])
            pattern[pick] = 0.5 + 0.5 * np.tanh(4 * np.sin(freq[pick] * u[pick] + phase[pick]) * np.sin(freq[pick] * v))
        elif k == 2:  # smooth blobs: a 5x5 random grid, bilinearly upsampled
            interp = _linear_interp_matrix(5, size).astype(np.float32)
            pattern[pick] = np.einsum("hr,nrs,ws->nhw", interp, grid[pick], interp)
        else:  # linear gradient
            pattern[pick] = np.clip(u[pick] / (size * 1.4) + offset[pick], 0, 1)
    grey = rng.uniform(60, 200, (n, 2, 1))
    tints = np.clip(grey + rng.uniform(-28, 28, (n, 2, 3)), 0, 255).astype(np.float32)  # [n, 2 tints, rgb]
    mix = pattern[..., None]
    image = tints[:, None, None, 0] + (tints[:, None, None, 1] - tints[:, None, None, 0]) * mix
    image += rng.standard_normal(image.shape, dtype=np.float32) * 5.0
    return image


def _linear_interp_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of linear interpolation (align_corners) from src to dst samples."""
    pos = np.linspace(0, src - 1, dst)
    lo = np.clip(np.floor(pos).astype(int), 0, src - 2)
    frac = pos - lo
    out = np.zeros((dst, src))
    out[np.arange(dst), lo] = 1 - frac
    out[np.arange(dst), lo + 1] = frac
    return out


def _layout(rng, n: int, size: int):
    """Per slot: (active [n] bool, class [n], params dict of [n] arrays); objects do not overlap."""
    count = rng.integers(1, MAX_OBJECTS + 1, n)
    radius = rng.uniform(0.11, 0.21, (n, MAX_OBJECTS)) * size
    centre = rng.uniform(0, 1, (n, MAX_OBJECTS, 2)) * (size - 2 * radius[..., None]) + radius[..., None]
    active = np.arange(MAX_OBJECTS)[None] < count[:, None]
    for slot in range(1, MAX_OBJECTS):
        for _ in range(30):  # rejection sampling, vectorised over the images still in conflict
            clash = _clashes(centre, radius, active, slot)
            if not clash.any():
                break
            fresh = rng.uniform(0, 1, (int(clash.sum()), 2)) * (size - 2 * radius[clash, slot, None]) \
                + radius[clash, slot, None]
            centre[clash, slot] = fresh
        active[:, slot] &= ~_clashes(centre, radius, active, slot)
    shape = rng.integers(0, len(SHAPES), (n, MAX_OBJECTS))
    colour = rng.integers(0, len(COLOURS), (n, MAX_OBJECTS))
    angle = rng.uniform(0, 2 * np.pi, (n, MAX_OBJECTS))
    for slot in range(MAX_OBJECTS):
        params = {"cx": centre[:, slot, 0], "cy": centre[:, slot, 1], "r": radius[:, slot],
                  "angle": angle[:, slot], "shape": shape[:, slot], "colour": colour[:, slot]}
        yield active[:, slot], shape[:, slot] * len(COLOURS) + colour[:, slot], params


def _clashes(centre: np.ndarray, radius: np.ndarray, active: np.ndarray, slot: int) -> np.ndarray:
    dist = np.linalg.norm(centre[:, :slot] - centre[:, slot : slot + 1], axis=-1)
    too_close = dist < (radius[:, :slot] + radius[:, slot : slot + 1]) * 1.05
    return active[:, slot] & (too_close & active[:, :slot]).any(axis=1)


def _shape_alpha(p: dict, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Antialiased coverage float32 [n, S, S] from each shape's signed distance (pixels)."""
    c = np.cos(p["angle"]).astype(np.float32)[:, None, None]
    s = np.sin(p["angle"]).astype(np.float32)[:, None, None]
    dx, dy = xx - p["cx"].astype(np.float32)[:, None, None], yy - p["cy"].astype(np.float32)[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy
    r = p["r"].astype(np.float32)[:, None, None]
    dist = np.empty_like(u)
    for k in range(len(SHAPES)):  # each image evaluates only its own shape
        pick = p["shape"] == k
        if pick.any():
            dist[pick] = _SDF[SHAPES[k]](u[pick], v[pick], r[pick])
    return np.clip(0.5 - dist, 0.0, 1.0)


def _triangle(u, v, r):
    normals = np.pi / 2 + np.arange(3) * 2 * np.pi / 3  # equilateral, inradius 0.6 r
    return np.max([u * np.float32(np.cos(a)) + v * np.float32(np.sin(a)) for a in normals], axis=0) - 0.6 * r


def _cross(u, v, r):
    arm = 0.36 * r
    return np.minimum(np.maximum(np.abs(u) - r, np.abs(v) - arm), np.maximum(np.abs(u) - arm, np.abs(v) - r))


_SDF = {
    "circle": lambda u, v, r: np.hypot(u, v) - r,
    "square": lambda u, v, r: np.maximum(np.abs(u), np.abs(v)) - 0.82 * r,
    "triangle": _triangle,
    "cross": _cross,
}


def _object_colour(rng, cls: np.ndarray, p: dict, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Float32 [n, S, S, 3]: the class colour with jitter and a linear shading across the object."""
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    base = (palette[p["colour"]] + rng.uniform(-18, 18, (len(cls), 3))).astype(np.float32)
    light = rng.uniform(0, 2 * np.pi, len(cls))
    cos, sin = (np.cos(light) / p["r"]).astype(np.float32), (np.sin(light) / p["r"]).astype(np.float32)
    along = (xx - p["cx"].astype(np.float32)[:, None, None]) * cos[:, None, None] \
        + (yy - p["cy"].astype(np.float32)[:, None, None]) * sin[:, None, None]
    shade = 1.0 + 0.22 * np.clip(along, -1, 1)
    return np.clip(base[:, None, None, :] * shade[..., None], 0, 255)


def _boxes_from_owner(owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight xyxy boxes [n, 3, 4] (pixel edges) and visible areas [n, 3] of each slot's pixels."""
    n, size, _ = owner.shape
    boxes = np.zeros((n, MAX_OBJECTS, 4), dtype=np.float32)
    areas = np.zeros((n, MAX_OBJECTS), dtype=np.int64)
    for slot in range(MAX_OBJECTS):
        hit = owner == slot
        rows, cols = hit.any(axis=2), hit.any(axis=1)
        areas[:, slot] = hit.sum(axis=(1, 2))
        boxes[:, slot, 0] = np.argmax(cols, axis=1)
        boxes[:, slot, 1] = np.argmax(rows, axis=1)
        boxes[:, slot, 2] = size - np.argmax(cols[:, ::-1], axis=1)
        boxes[:, slot, 3] = size - np.argmax(rows[:, ::-1], axis=1)
    return boxes, areas


def cache_folder(num_images: int, image_size: int, seed: int, split: str, cache_dir: Optional[Path] = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"shapes-v{VERSION}-{split}-n{num_images}-seed{seed}-{image_size}px"


_KEYS = ("images", "masks", "boxes", "box_labels", "labels")


def open_cached(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in _KEYS}


def load_or_generate(num_images: int, image_size: int, seed: int, split: str,
                     cache_dir: Optional[Path] = None) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of :func:`generate`, from the cache or freshly written to it."""
    folder = cache_folder(num_images, image_size, seed, split, cache_dir)
    if not all((folder / f"{k}.npy").is_file() for k in _KEYS):
        data = generate(num_images, image_size, seed, split)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
        for key in _KEYS:
            np.save(tmp / f"{key}.npy", data[key])
        try:
            os.replace(tmp, folder)  # atomic: a concurrent reader sees all files or none
        except OSError:  # another process won the race (target exists and is not empty)
            shutil.rmtree(tmp, ignore_errors=True)
    return open_cached(folder)


class ShapesDataset(ImageDataset):
    """The built-in dataset; ids are ``shapes-{S}px-seed{seed}-{split}-{index:06d}``."""

    name = "shapes"
    has_labels = True
    has_boxes = True
    has_masks = True

    def __init__(self, num_images: int, image_size: int = 64, seed: int = 0, split: str = "train",
                 cache_dir: Optional[Path] = None, *, size: int, flip: bool, on_bad_image: str = "raise",
                 flip_seed: int = 0, exif_orientation: str = "ignore"):
        self.arrays = load_or_generate(num_images, image_size, seed, split, cache_dir)
        self.folder = cache_folder(num_images, image_size, seed, split, cache_dir)
        ids = [f"shapes-{image_size}px-seed{seed}-{split}-{i:06d}" for i in range(num_images)]
        super().__init__(ids, size=size, flip=flip, on_bad_image=on_bad_image, seed=flip_seed,
                         class_names=CLASS_NAMES, mask_class_names=("background",) + CLASS_NAMES,
                         exif_orientation=exif_orientation)  # no files: "ignore" only (base refuses "apply")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["arrays"] = None  # a pickled memmap would copy every image; spawned workers re-open the cache
        return state

    def source(self, index: int) -> str:
        return self.ids[index]

    def load(self, index: int) -> RawSample:
        if self.arrays is None:
            self.arrays = open_cached(self.folder)
        a = self.arrays
        labels = np.asarray(a["box_labels"][index], dtype=np.int64)
        present = labels >= 0
        return RawSample(
            image=Image.fromarray(np.asarray(a["images"][index]), "RGB"),
            label=int(a["labels"][index]),
            boxes=np.asarray(a["boxes"][index], dtype=np.float64)[present],
            box_labels=labels[present],
            mask=np.asarray(a["masks"][index]),
        )
