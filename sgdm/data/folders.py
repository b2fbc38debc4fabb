"""Datasets of image files on disk: a folder tree, a list file (LDM's LSUN layout), ImageNet-100.

File ids are paths relative to the root with ``/`` separators (extension
kept, so ``a.jpg`` and ``a.png`` stay distinct). Extensions match in any case
(``.JPEG`` is ImageNet's).
"""
from __future__ import annotations

import codecs
import logging
import os
import posixpath
import re
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

from sgdm.config.core import ConfigError
from sgdm.data.base import ImageDataset, RawSample, limit
from sgdm.data.decode import IMAGE_EXTENSIONS, is_image_file, printable

log = logging.getLogger(__name__)


def require_dir(path: Path, key: str, what: str) -> Path:
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        raise ConfigError(key, f"{what} {path} {state}")
    return path


def require_file(path: Path, key: str, what: str) -> Path:
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(key, f"{what} {path} {state}")
    return path


def scan_images(root: Path) -> list[str]:
    """Sorted relative paths of every image file under ``root`` (symlinks followed).

    Hidden files and folders (name starting with ``.``: ``.thumbnails``, ``.ipynb_checkpoints``)
    are left out: tools keep copies there. Each folder is read once, identified by
    ``(st_dev, st_ino)``: the real tree first, then the folders only symlinks lead to, so a cycle
    (``sub/loop -> ..``) or a second link to a folder gives no image a second id, and adding a
    link never renames an image. One warning says how many folders were reached again.
    """
    found, seen, again, unlisted = [], set(), [], []

    def cannot_list(err: OSError) -> None:  # os.walk would leave such a folder out without a word
        if not isinstance(err, FileNotFoundError):  # one that vanished since it was listed held nothing
            unlisted.append(err)

    pending = [Path(root)]
    while pending:
        for folder, dirs, files in os.walk(pending.pop(0), onerror=cannot_list):  # links queued, not followed
            try:
                info = os.stat(folder)
            except OSError:  # vanished since it was listed: os.walk had nothing to give either
                dirs[:] = []
                continue
            if (info.st_dev, info.st_ino) in seen:
                again.append(folder)
                dirs[:] = []
                continue
            seen.add((info.st_dev, info.st_ino))
            visible = sorted(d for d in dirs if not d.startswith("."))
            pending.extend(Path(folder, d) for d in visible if os.path.islink(os.path.join(folder, d)))
            dirs[:] = [d for d in visible if not os.path.islink(os.path.join(folder, d))]
            rel = Path(folder).relative_to(root)
            found.extend((rel / f).as_posix() for f in files if is_image_file(f) and not f.startswith("."))
    if again:
        log.warning("%s: %d folder(s) reached again through symlinks were read once only (first: %s)",
                    root, len(again), again[0])
    if unlisted:
        first = unlisted[0]
        log.warning("%s: %d folder(s) cannot be listed and their images are left out (first: %s: %s)", root,
                    len(unlisted), printable(str(first.filename)), first.strerror or first)
    return sorted(found)


def read_text(path: Path, key: str) -> str:
    """The text of a list file: UTF-8 with an optional byte-order mark (Windows editors write one, and
    it would otherwise stick to the first name), or UTF-16 with its byte-order mark (what Windows
    PowerShell's ``>`` writes). Bytes that are not UTF-8 (a Latin-1 file name) become surrogate escapes,
    as ``os.walk`` names such a file, so the file is found. A NUL character is refused naming the line:
    no file name holds one (UTF-16 without a byte-order mark, or not a text file)."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = raw.decode("utf-16")
        except UnicodeDecodeError as err:
            raise ConfigError(key, f"{path} starts as UTF-16 text but is not ({err}); save it as UTF-8") from None
    else:
        text = raw.decode("utf-8-sig", errors="surrogateescape")
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ConfigError(key, f"{path} line {line} holds a NUL character: not UTF-8 text (UTF-16 without its "
                               "byte-order mark?); save it as UTF-8, one name a line")
    return text


def read_list(path: Path, key: str) -> list[str]:
    """Non-empty, non-comment lines of a list file (:func:`read_text`), stripped; any line ends."""
    require_file(path, key, "list file")
    text = read_text(path, key)
    numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    numbered = [(n, line) for n, line in numbered if line and not line.startswith("#")]
    names = [line for _, line in numbered]
    repeat = first_repeat(names)
    if repeat is not None:  # a repeated image would be trained on twice and break the annotation store's ids
        first, again = (numbered[i][0] for i in repeat)
        raise ConfigError(key, f"{printable(names[repeat[1]])} is listed twice in {path} (lines {first} and {again}); "
                          "remove the repeated line")
    return names


def require_distinct(ids: Sequence, lines: Sequence[str], list_file: Path, key: str) -> None:
    """Refuse two lines of ``list_file`` that name the same image id (e.g. with and without a folder)."""
    repeat = first_repeat(ids)
    if repeat is not None:
        i, j = repeat
        raise ConfigError(key, f"{list_file}: {lines[i]!r} and {lines[j]!r} name the same image "
                          f"{printable(str(ids[i]))}; remove one of them")


def list_ids(lines: Sequence[str], root: Path, list_file: Path, key: str) -> list[str]:
    """The id of the file each line of ``list_file`` names: its path below ``root`` with ``/``, spelt
    as a scan of the folder spells it (``./a.jpg``, ``sub//a.jpg`` and ``sub/../a.jpg`` are ``a.jpg``,
    so ``find . -name '*.jpg' > list.txt`` works, with ``data.folder_labels`` too; an absolute path
    inside root is made relative). A line that leads out of root is refused: its id would not be a
    path below root, and its first folder (``..``, ``/``) would be taken for a class. Two lines that
    name one file are refused."""
    bases = sorted({os.path.abspath(root), os.path.realpath(root)})
    ids = []
    for line in lines:
        path = posixpath.normpath(line)
        if posixpath.isabs(path):
            inside = [b for b in bases if path.startswith(b.rstrip("/") + "/")]
            path = path[len(inside[0].rstrip("/")) + 1:] if inside else path
        if posixpath.isabs(path) or path in (".", "..") or path.startswith("../"):
            raise ConfigError(key, f"{list_file}: {printable(line)!r} is not a file below the dataset root {root}; "
                                   "list paths relative to it")
        ids.append(path)
    require_distinct(ids, lines, list_file, key)
    return ids


def first_repeat(items: Sequence) -> Optional[tuple[int, int]]:
    """Positions ``(i, j)``, ``i < j``, of the first item that occurs again, or None when all differ."""
    seen: dict = {}
    for j, item in enumerate(items):
        if item in seen:
            return seen[item], j
        seen[item] = j
    return None


class FileDataset(ImageDataset):
    """Images at ``root / id``; optional integer class per item."""

    name = "image_folder"

    def __init__(self, root: Path, files: Sequence[str], labels: Optional[Sequence[int]] = None,
                 class_names: Sequence[str] = (), **kwargs):
        super().__init__(files, class_names=class_names, **kwargs)
        self.root = Path(root)
        self.labels = None if labels is None else list(labels)
        self.has_labels = labels is not None

    def source(self, index: int) -> str:
        return str(self.root / self.ids[index])

    def item_files(self, index: int) -> tuple[str, ...]:
        return (self.source(index),)

    def load(self, index: int) -> RawSample:
        return self.read(self.source(index), label=None if self.labels is None else self.labels[index])


def _empty(root: Path, key: str, detail: str = "") -> ConfigError:
    return ConfigError(key, f"no images found under {root}{detail}")


def image_folder(root: Path, list_file: Optional[Path], folder_labels: bool, max_images: Optional[int],
                 key: str, name: str = "image_folder", **kwargs) -> FileDataset:
    """Any tree of images, or the files named by ``list_file`` (relative to ``root``).

    Files named by a list are not checked here: a missing one is a bad file,
    reported when read (and by ``validate-data``), like a corrupt one. Its lines become ids as
    :func:`list_ids` spells them (``./a.jpg`` is ``a.jpg``); a line that leads out of root is refused.
    """
    require_dir(root, f"{key}.root", "dataset root")
    if list_file is not None:
        lines = read_list(list_file, f"{key}.list_file")
        if not lines:
            raise ConfigError(f"{key}.list_file", f"list file {list_file} names no files")
        files = list_ids(lines, root, list_file, f"{key}.list_file")
    else:
        files = scan_images(root)
        if not files:
            raise _empty(root, f"{key}.root", f" (extensions: {' '.join(sorted(IMAGE_EXTENSIONS))}, any case; "
                                              "hidden files and folders are skipped)")
    files = limit(files, max_images)
    labels, classes = None, ()
    if folder_labels:
        if any("/" not in f for f in files):
            bad = next(f for f in files if "/" not in f)
            raise ConfigError(f"{key}.folder_labels", f"{bad} is not inside a class folder")
        classes = sorted({f.split("/", 1)[0] for f in files})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[f.split("/", 1)[0]] for f in files]
    dataset = FileDataset(root, files, labels, classes, **kwargs)
    dataset.name = name
    return dataset


def imagenet100_wnids(class_list: Optional[Path], key: str) -> list[str]:
    """The 100 WordNet ids of CMC's ImageNet-100 (shipped with sgdm), or those of ``class_list``.

    A line of ``class_list`` is a WordNet id, optionally followed by anything after a space, tab or
    comma (``LOC_synset_mapping.txt``'s ``n01440764 tench, Tinca tinca``); any other line is refused.
    """
    if class_list is not None:
        wnids = []
        for line in read_list(class_list, f"{key}.class_list"):
            match = re.match(r"(n\d{8})(?:[\s,]|$)", line)
            if match is None:
                raise ConfigError(f"{key}.class_list", f"{class_list}: {printable(line)!r} does not start with a "
                                  "WordNet id such as n01440764")
            wnids.append(match.group(1))
    else:
        wnids = resources.files("sgdm.data").joinpath("imagenet100_wnids.txt").read_text().split()
    repeat = first_repeat(wnids)
    if repeat is not None:
        raise ConfigError(f"{key}.class_list", f"class list repeats the WordNet id {wnids[repeat[0]]}")
    return wnids


def imagenet100(root: Path, split: str, class_list: Optional[Path], max_images: Optional[int], key: str,
                val_labels: Optional[Path] = None, **kwargs) -> FileDataset:
    """``root/{train,val}/<wnid>/*.JPEG`` restricted to the 100 classes; label = index in the class list.

    The val split is read in the same per-class folders as train (the common reorganised layout)
    or, with ``val_labels`` (a ground-truth file, :mod:`sgdm.data.imagenet_val`), in the official
    flat layout: ``root/val/ILSVRC2012_val_*.JPEG``, ids the file names in sorted order.
    """
    wnids = imagenet100_wnids(class_list, key)
    root = require_dir(Path(root), f"{key}.root", "ImageNet root")
    split_dir = root / split
    if not split_dir.is_dir():
        inside = any((root / w).is_dir() for w in wnids)  # root is the split folder itself (root: /data/imagenet/train)
        below = _split_below(root, split)  # root is the top of Kaggle's download (ILSVRC/Data/CLS-LOC/train)
        hint = (f"; {root} holds class folders itself: point root at its parent" if inside else
                f"; point root at {below}" if below is not None else "")
        raise ConfigError(f"{key}.root", f"ImageNet {split} folder {split_dir} "
                          f"{'is not a directory' if split_dir.exists() else 'does not exist'} "
                          f"(root holds train/<wnid>/ and val/<wnid>/){hint}")
    present = [w for w in wnids if (split_dir / w).is_dir()]
    if split == "val" and val_labels is not None:
        if present:
            raise ConfigError(f"{key}.val_labels", f"{split_dir} is in per-class folders ({split_dir / present[0]}, "
                              "...), whose names are the classes; val_labels is for the official flat layout: "
                              "remove it")
        dataset = _flat_val(split_dir, wnids, val_labels, max_images, f"{key}.val_labels", **kwargs)
        dataset.name = "imagenet100"
        return dataset
    if not present:
        loose = len(_loose_images(split_dir))
        if loose and split == "val":
            hint = (f" It holds {loose} images directly: ImageNet's official flat val layout. Set {key}.val_labels "
                    "to its ground truth (LOC_val_solution.csv, or the devkit's "
                    "ILSVRC2012_validation_ground_truth.txt with meta.mat beside it) to read it.")
        elif loose:
            hint = f" It holds {loose} images directly; the {split} split is read in per-class folders only."
        else:
            hint = f" Is the {split} split in per-class folders?"
        raise ConfigError(f"{key}.root", f"{split_dir} has none of the {len(wnids)} class folders "
                          f"(expected e.g. {split_dir / wnids[0]}).{hint}")
    if len(present) < len(wnids):
        missing = [w for w in wnids if w not in present]
        log.warning("imagenet100: %d of %d class folders missing under %s (first: %s)",
                    len(missing), len(wnids), split_dir, missing[0])
    files, labels, empty = [], [], []
    for label, wnid in enumerate(wnids):
        if wnid in present:
            names = scan_images(split_dir / wnid)
            files.extend(f"{wnid}/{n}" for n in names)
            labels.extend([label] * len(names))
            if not names:
                empty.append(wnid)
    if not files:
        raise _empty(split_dir, f"{key}.root")
    if empty:  # a class without images: its label never occurs (an interrupted copy or extraction)
        log.warning("imagenet100: %d class folder(s) under %s hold no images (first: %s)",
                    len(empty), split_dir, split_dir / empty[0])
    dataset = FileDataset(split_dir, limit(files, max_images), limit(labels, max_images), wnids, **kwargs)
    dataset.name = "imagenet100"
    return dataset


def folder_below(root: Path, relative: str | Path) -> Optional[Path]:
    """The first (sorted) visible folder right below ``root`` that holds the folder ``relative``, or None: the
    root to suggest when ``root`` is one level too high (a download's own top folder). One level only:
    root may be a large disk."""
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return None
    return next((child for child in children if (child / relative).is_dir()), None)


def _split_below(root: Path, split: str) -> Optional[Path]:
    """The folder of ImageNet's usual downloads below ``root`` that holds ``split/`` (Kaggle's
    ``ILSVRC/Data/CLS-LOC``, or one folder down), or None."""
    for below in (Path("Data", "CLS-LOC"), Path("ILSVRC", "Data", "CLS-LOC")):
        if (root / below / split).is_dir():
            return root / below
    return folder_below(root, split)


def _loose_images(folder: Path) -> list[str]:
    """Sorted names of the visible image files directly in ``folder``."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_file() and is_image_file(entry.name) and not entry.name.startswith("."))


def _flat_val(split_dir: Path, wnids: list[str], val_labels: Path, max_images: Optional[int], key: str,
              **kwargs) -> FileDataset:
    """The images of ``split_dir`` (flat) whose ground-truth class is in ``wnids``, by file name.

    An image the ground truth does not name is left out with a warning (all of them: an error, as
    when the file is the train split's); so are the ground truth's images of these classes that are
    missing from the folder (an interrupted extraction).
    """
    from sgdm.data.imagenet_val import image_stem, read_val_labels

    truth = read_val_labels(val_labels, key)
    names = _loose_images(split_dir)
    if not names:
        raise _empty(split_dir, key.rsplit(".", 1)[0] + ".root", " (the official flat val layout holds "
                     "ILSVRC2012_val_*.JPEG directly)")
    index = {w: i for i, w in enumerate(wnids)}
    files, labels, unnamed = [], [], []
    for name in names:
        wnid = truth.get(image_stem(name))
        if wnid is None:
            unnamed.append(name)
        elif wnid in index:
            files.append(name)
            labels.append(index[wnid])
    if len(unnamed) == len(names):
        raise ConfigError(key, f"{val_labels} names none of the {len(names)} images of {split_dir} (first image: "
                          f"{printable(names[0])}, first named: {printable(next(iter(truth)))}); is it the val "
                          "split's ground truth?")
    if unnamed:
        log.warning("imagenet100: %d image(s) of %s are not in %s and are left out (first: %s)",
                    len(unnamed), split_dir, val_labels, printable(unnamed[0]))
    if not files:
        raise ConfigError(key, f"no image of {split_dir} belongs to the {len(wnids)} classes by {val_labels}")
    stems = {image_stem(name) for name in names}
    absent = sorted(stem for stem, wnid in truth.items() if wnid in index and stem not in stems)
    if absent:
        log.warning("imagenet100: %d image(s) of these classes in %s are missing from %s (first: %s)",
                    len(absent), val_labels, split_dir, printable(absent[0]))
    return FileDataset(split_dir, limit(files, max_images), limit(labels, max_images), wnids, **kwargs)
