"""ImageNet's official flat val folder: the class of each ``ILSVRC2012_val_*.JPEG``.

The official val split is one folder of 50,000 images without class folders; a ground-truth
file says which class each one shows (``data.val_labels``). Two files are read:

- a file naming each image and its WordNet id on one line, the name with or without its
  extension, then the id after a comma or white space; anything after the id is ignored, and a
  first line without an id is a header. This is Kaggle's ``LOC_val_solution.csv`` (``ImageId,
  PredictionString``: the name, then the image's boxes as ``wnid x0 y0 x1 y1 ...``, all of one
  class), and any ``name wnid`` list made by hand.
- the ILSVRC2012 devkit's ``data/ILSVRC2012_validation_ground_truth.txt``: line i holds the
  ILSVRC2012_ID (1-1000) of ``ILSVRC2012_val_<i, 8 digits>``, and the devkit's ``meta.mat``
  beside it maps those ids to WordNet ids.
"""
from __future__ import annotations

import re
from pathlib import Path

from sgdm.config.core import ConfigError
from sgdm.data.decode import is_image_file, printable
from sgdm.data.folders import read_text

__all__ = ["read_val_labels", "image_stem"]

_WNID = re.compile(r"n\d{8}")
_LINE = re.compile(r"\s*([^,\s]+)[\s,]+(n\d{8})(?:[\s,]|$)")


def image_stem(name: str) -> str:
    """``name`` without its image extension (``ILSVRC2012_val_00000001.JPEG`` -> ``ILSVRC2012_val_00000001``),
    the key :func:`read_val_labels` gives each image by."""
    return name.rsplit(".", 1)[0] if is_image_file(name) else name


def read_val_labels(path: Path, key: str) -> dict[str, str]:
    """Image name (without extension) -> WordNet id, from a ground-truth file (module docstring).

    Errors name ``key``: a missing file, a line that is neither a name and an id nor (in a devkit
    file) a class number, an image named twice, a devkit file without its ``meta.mat``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(key, f"ImageNet val ground truth {path} {'is not a file' if path.exists() else 'does not exist'}")
    text = read_text(path, key)
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise ConfigError(key, f"ImageNet val ground truth {path} is empty")
    if all(line.isdigit() for _, line in lines):
        return _devkit_labels(path, [(n, int(line)) for n, line in lines], key)
    if _WNID.search(lines[0][1]) is None:
        lines = lines[1:]  # a header: "ImageId,PredictionString"
    labels: dict[str, str] = {}
    where: dict[str, int] = {}
    for n, line in lines:
        match = _LINE.match(line)
        if match is None:
            raise ConfigError(key, f"{path} line {n}: {printable(line)[:80]!r} is not an image name followed by a "
                                   "WordNet id (as LOC_val_solution.csv's 'ILSVRC2012_val_00000001,n01751748 ...')")
        stem = image_stem(match.group(1))
        if stem in labels:
            raise ConfigError(key, f"{path}: image {printable(stem)} is named twice (lines {where[stem]} and {n})")
        labels[stem], where[stem] = match.group(2), n
    if not labels:
        raise ConfigError(key, f"ImageNet val ground truth {path} names no image")
    return labels


def _devkit_labels(path: Path, numbered: list[tuple[int, int]], key: str) -> dict[str, str]:
    meta = path.parent / "meta.mat"
    if not meta.is_file():
        raise ConfigError(key, f"{path} holds class numbers (the devkit's ILSVRC2012_validation_ground_truth.txt); "
                               f"their WordNet ids are in the devkit's meta.mat, expected beside it at {meta}")
    wnids = _devkit_wnids(meta, key)
    labels = {}
    for n, number in numbered:  # line n is image n
        if number not in wnids:
            raise ConfigError(key, f"{path} line {n}: class number {number} is not an ILSVRC2012_ID of {meta} "
                                   f"(1-{max(wnids)})")
        labels[f"ILSVRC2012_val_{n:08d}"] = wnids[number]
    return labels


def _devkit_wnids(meta: Path, key: str) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of the devkit's ``meta.mat`` (its ``synsets`` struct array)."""
    import scipy.io
    from scipy.io.matlab import MatReadError

    try:
        synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except (MatReadError, NotImplementedError, OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise ConfigError(key, f"{meta} is not the devkit's meta.mat (a 'synsets' struct array with ILSVRC2012_ID, "
                               f"WNID and num_children): {type(err).__name__}: {err}") from None
