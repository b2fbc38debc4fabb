"""The annotation store: what ``sgdm-ldm annotate`` writes and training reads.

A directory with sharded safetensors files and a JSON manifest::

    manifest.json            version, granularity (label|box|mask), source (self|gt),
                             num_classes (K), method, params, extractor (backbone,
                             weights hash), dataset (config, ids hash), ids, shards,
                             files_sha256 + file_sizes (datasets of files: the sizes of
                             each stored image's files when annotated, sgdm.data.files),
                             feature_precision (bf16|fp32: what the self-annotated
                             store's features were extracted at; adherence's too)
    shard_00000.safetensors  per image, rows in manifest order:
                             cluster int64 [n]        (label, box; -1 = no annotation, box only)
                             box float32 [n, 4]       (box; all zeros where cluster is -1)
                             mask uint8 [n, h, w]     (mask; 255 = ignore)
                             multi_hot float32 [n, K] (mask)

Annotations describe the dataset's preprocessed, UNFLIPPED image: boxes are
normalised xyxy in ``[0, 1]``; masks are class maps at any resolution covering
the image; ``multi_hot`` is the spatial max-pool of the one-hot mask (Eq. 9).
Consumers mirror boxes and masks of samples whose ``flipped`` is True. The
manifest is written last (atomically), so a directory without one is not a
store.

"No annotation" marker (box stores only): a row with ``cluster == NO_ANNOTATION``
(-1) and box ``[0, 0, 0, 0]`` describes an image that has NO guidance, e.g. a
ground-truth box store's image with no box left after the centre crop (no
objects, all objects outside the crop, only ``difficult`` boxes). The image stays
in the store (training's data order and id checks are unchanged), but it is
never guided: training gives it the null condition (the zeros of guidance
dropout, so it is trained unconditionally), evaluation never draws it, the
gallery lists it apart. :func:`is_annotated` / :meth:`AnnotationStore.annotated`
tell such rows apart; a ground-truth store's manifest counts and lists them
(``images_without_gt_box``, ``ids_without_gt_box``). Any other negative cluster
is refused.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sgdm.atomic import atomic_open, atomic_write_text

__all__ = ["AnnotationStore", "StoreMismatchError", "write_store", "ids_hash", "STORE_VERSION",
           "NO_ANNOTATION", "is_annotated"]

STORE_VERSION = 1
MANIFEST = "manifest.json"
SEGMENTER_FILE = "segmenter.safetensors"  # self-segmented stores: the fitted f (head + centroids)
FIELDS = {"label": ("cluster",), "box": ("cluster", "box"), "mask": ("mask", "multi_hot")}
IGNORE = 255
NO_ANNOTATION = -1  # cluster of a box-store row without annotation (its box is all zeros): no guidance
# manifest keys later versions of annotate add, in groups (the k-means centroids of a label or box store; the
# images' file sizes; the precision its features were extracted at): a store annotated again with the same settings differs from the one an earlier version
# wrote by these alone, and holds the same annotations (AnnotationStore.matches_digest)
ADDED_KEYS = (("centroids", "centroids_sha256"), ("files_sha256", "file_sizes"), ("feature_precision",))


def is_annotated(record: Mapping[str, Any]) -> bool:
    """Whether a store record (``AnnotationStore.get``) carries guidance: False only for the
    no-annotation marker (``cluster == NO_ANNOTATION``); mask records are always annotated."""
    return "cluster" not in record or int(record["cluster"]) != NO_ANNOTATION


class StoreMismatchError(ValueError):
    """An annotation store does not fit the dataset or model it is used with."""


def ids_hash(ids: Iterable[str]) -> str:
    """sha256 of the ids in order (newline-joined UTF-8): the dataset list fingerprint.

    A file name that is not valid UTF-8 (e.g. Latin-1 ``caf\xe9.png`` from an old archive) is an
    id with surrogate escapes, as ``os.walk`` gives it; it is hashed as its original bytes.
    """
    digest = hashlib.sha256()
    for i in ids:
        digest.update(str(i).encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
    return digest.hexdigest()


def save_tensors_atomic(path: pathlib.Path, tensors: Mapping[str, torch.Tensor],
                        metadata: Optional[Mapping[str, str]] = None) -> None:
    """A safetensors file written atomically: a shard either exists whole or not at all (resume relies on it)."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=None if metadata is None else dict(metadata))
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def read_tensors(path: pathlib.Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the safetensors file ``path`` that annotate keeps with a store (``what``,
    e.g. "centroids file"), read in one open; a missing or unreadable file is an error naming it."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{what} {path} cannot be read ({err}); rerun `sgdm-ldm annotate` to make the store and "
                         f"its {what.split()[0]} again") from None


# mask pixels per block of multi_hot_from_masks and of the mask value checks: multi_hot's int64 and bool
# temporaries (17 bytes a pixel) stay ~70 MB, not ~24 bytes for every pixel of the store (185 GB for a 256-pixel
# ground-truth store of COCO's 118k images); blocks of 1 << 24 pixels with 25 bytes a pixel made ~400 MB
_MULTI_HOT_BLOCK_PIXELS = 1 << 22


def mask_blocks(masks: torch.Tensor):
    """``(start, block)``: consecutive class maps of ``masks [n, ...]`` flattened to ``[b, pixels]``, at most
    ``_MULTI_HOT_BLOCK_PIXELS`` pixels (or one map) a block, so that per-pixel temporaries stay bounded."""
    flat = masks.reshape(masks.shape[0], -1)
    step = max(1, _MULTI_HOT_BLOCK_PIXELS // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], step):
        yield start, flat[start : start + step]


def multi_hot_from_masks(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[n, K]`` float: class k present anywhere in the map (max-pool of the one-hot); 255 ignored."""
    out = torch.zeros(masks.shape[0], num_classes + 1, device=masks.device)
    for start, block in mask_blocks(masks):
        index = block.long().clamp(max=num_classes)  # a new tensor also when block is int64 already
        index.masked_fill_(block == IGNORE, num_classes)
        out[start : start + len(block)].scatter_(1, index, 1.0)
    return out[:, :num_classes]


def _check_records(records: Mapping[str, torch.Tensor], granularity: str, n: int, num_classes: int) -> None:
    for name in FIELDS[granularity]:
        if name not in records:
            raise ValueError(f"write_store: granularity {granularity!r} needs field {name!r}")
        if records[name].shape[0] != n:
            raise ValueError(f"write_store: field {name!r} has {records[name].shape[0]} rows for {n} ids")
    if "cluster" in records and n:
        cluster = records["cluster"]
        marker = cluster == NO_ANNOTATION if granularity == "box" else torch.zeros_like(cluster, dtype=torch.bool)
        bad = ~marker & ((cluster < 0) | (cluster >= num_classes))
        if bool(bad.any()):
            allowed = f"[0, {num_classes})" + (f" or {NO_ANNOTATION} (no annotation)" if granularity == "box" else "")
            raise ValueError(f"write_store: cluster ids must lie in {allowed}, got {int(cluster[bad][0])}")
        if bool(marker.any()) and bool(records["box"][marker].any()):
            raise ValueError(f"write_store: a row with cluster {NO_ANNOTATION} (no annotation) must have "
                             "box [0, 0, 0, 0]")
    if "mask" in records:
        worst = None
        for _, block in mask_blocks(records["mask"]):  # a bool per pixel of the store would be as large as the masks
            bad = (block >= num_classes) & (block != IGNORE)
            if bool(bad.any()):
                worst = max(worst or 0, int(block[bad].max()))
        if worst is not None:
            raise ValueError(f"write_store: mask values must be < K={num_classes} or {IGNORE}, got {worst}")


def write_store(
    path: str | os.PathLike,
    ids: Sequence[str],
    records: Mapping[str, torch.Tensor],
    *,
    granularity: str,
    num_classes: int,
    shard_size: int = 1024,
    extra: Optional[Mapping[str, Any]] = None,
    sizes: Optional[Sequence[Sequence[Optional[int]]]] = None,
) -> "AnnotationStore":
    """Write ``records`` (row i describes ``ids[i]``) as a store; ``extra`` goes into the manifest.

    ``sizes``: the file sizes of ``ids[i]``'s item (:func:`sgdm.data.files.item_sizes`, taken before its
    pixels were read), recorded as ``file_sizes`` and their digest ``files_sha256``
    (:func:`sgdm.data.files.files_hash` of these ids): :meth:`AnnotationStore.replaced` names the
    images replaced since. None: a dataset without files of its own per item (shapes, an LMDB)."""
    if granularity not in FIELDS:
        raise ValueError(f"write_store: granularity must be one of {', '.join(FIELDS)}, got {granularity!r}")
    if granularity == "mask" and num_classes > IGNORE:
        raise ValueError(f"write_store: a mask store holds at most {IGNORE} classes (uint8 class maps, {IGNORE} = "
                         f"ignore), got num_classes={num_classes}")
    if len(set(ids)) != len(ids):
        raise ValueError("write_store: ids are not unique")
    if sizes is not None and len(sizes) != len(ids):
        raise ValueError(f"write_store: sizes has {len(sizes)} items for {len(ids)} ids")
    records = dict(records)
    if granularity == "mask" and "multi_hot" not in records:
        records["multi_hot"] = multi_hot_from_masks(records["mask"], num_classes)
    _check_records(records, granularity, len(ids), num_classes)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).unlink(missing_ok=True)  # the store is invalid until the new manifest lands
    shards = []
    for index, start in enumerate(range(0, len(ids), shard_size)):
        name = f"shard_{index:05d}.safetensors"
        rows = {k: records[k][start : start + shard_size] for k in FIELDS[granularity]}
        save_tensors_atomic(path / name, rows)
        shards.append({"file": name, "start": start, "count": len(rows[FIELDS[granularity][0]])})
    manifest = dict(extra or {})
    manifest.update(
        version=STORE_VERSION,
        granularity=granularity,
        num_classes=int(num_classes),
        num_images=len(ids),
        ids_sha256=ids_hash(ids),
        ids=list(ids),
        shards=shards,
    )
    if sizes is not None:
        from sgdm.data.files import files_hash

        manifest.update(files_sha256=files_hash(ids, sizes), file_sizes=[list(s) for s in sizes])
    manifest.setdefault("source", "self")
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1))
    return AnnotationStore.open(path)


def _leaves(section: Mapping[str, Any], prefix: str):
    """``(dotted key, value)`` of every non-mapping value in a nested settings mapping."""
    for key, value in section.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


class AnnotationStore:
    """Read access to a store written by :func:`write_store`; shards load lazily."""

    def __init__(self, path: pathlib.Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._index = {i: n for n, i in enumerate(manifest["ids"])}
        self._shards: dict[int, dict[str, torch.Tensor]] = {}
        self._starts = [s["start"] for s in manifest["shards"]]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "AnnotationStore":
        """The store in directory ``path`` (``AnnotationResult.store``), its manifest read and checked; the
        shards load on first use. No manifest (an unfinished run) is a FileNotFoundError, an unreadable
        one, another store version or a missing manifest key a ValueError, each naming the store."""
        path = pathlib.Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            hint = " (an unfinished run? rerun `sgdm-ldm annotate` to resume)" if path.is_dir() else ""
            raise FileNotFoundError(f"annotation store {path}: no {MANIFEST}{hint}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"annotation store {path}: {MANIFEST} cannot be read as JSON ({err}); rerun "
                             f"`sgdm-ldm annotate` to write the store again") from None
        version = manifest.get("version")
        if version != STORE_VERSION:
            raise ValueError(f"annotation store {path}: version {version!r}, this sgdm reads version {STORE_VERSION}")
        for key in ("granularity", "num_classes", "ids", "shards", "source"):
            if key not in manifest:
                raise ValueError(f"annotation store {path}: {MANIFEST} lacks {key!r}")
        return cls(path, manifest)

    ids = property(lambda self: self.manifest["ids"], doc="The image ids (list of str), in the order written.")
    num_classes = property(lambda self: int(self.manifest["num_classes"]),
                           doc="K: cluster ids and mask class ids lie in [0, K).")
    granularity = property(lambda self: self.manifest["granularity"],
                           doc="``label``, ``box`` or ``mask``: which fields :meth:`get` returns.")
    source = property(lambda self: self.manifest["source"],
                      doc="``self`` (self-annotation, Sec. 3.2) or ``gt`` (filled from ground truth).")
    method = property(lambda self: self.manifest.get("method"),
                      doc="What annotated it (``kmeans``, ``lost+kmeans``, ``stego``, ``patch-kmeans``, "
                          "``ground-truth``); None for a store that did not record it.")

    def content_digest(self) -> str:
        """SHA-256 of the manifest and every shard file, in order: equal digests, equal annotations.
        A training run records it so that a resume notices a store re-made at the same path."""
        return self._digests([(self.path / MANIFEST).read_bytes()])[0]

    def matches_digest(self, recorded: Optional[str]) -> bool:
        """Whether ``recorded`` (a :meth:`content_digest` taken earlier, e.g. by a training run) names the
        annotations this store holds: its content digest now, or one it had when an earlier version of
        annotate wrote it, without some of the manifest keys later versions add (:data:`ADDED_KEYS`): the
        same shards, and the same manifest but for those keys. A store annotated again with the same
        settings to gain its k-means centroids (cluster adherence) still matches the run trained on it."""
        if not recorded:
            return False
        present = [group for group in ADDED_KEYS if any(k in self.manifest for k in group)]
        manifests = [(self.path / MANIFEST).read_bytes()]
        for mask in range(1, 1 << len(present)):  # every non-empty set of the added groups left out
            dropped = {k for i, group in enumerate(present) if mask >> i & 1 for k in group}
            manifests.append(json.dumps({k: v for k, v in self.manifest.items() if k not in dropped},
                                        indent=1).encode())  # as write_store writes it
        return recorded in self._digests(manifests)

    def _digests(self, manifests: Sequence[bytes]) -> list[str]:
        """SHA-256 of each of ``manifests`` followed by every shard file, in order, reading the shards once."""
        hashes = [hashlib.sha256(m) for m in manifests]
        for info in self.manifest["shards"]:
            with open(self.path / info["file"], "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    for h in hashes:
                        h.update(block)
        return [h.hexdigest() for h in hashes]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._index

    def _shard(self, number: int) -> dict[str, torch.Tensor]:
        if number not in self._shards:
            info = self.manifest["shards"][number]
            file = self.path / info["file"]
            if not file.is_file():
                raise FileNotFoundError(f"annotation store {self.path}: shard {info['file']} is missing")
            try:
                self._shards[number] = load_file(str(file))
            except SafetensorError as err:
                raise ValueError(f"annotation store {self.path}: shard {info['file']} cannot be read ({err}); "
                                 f"rerun `sgdm-ldm annotate` to write the store again") from None
        return self._shards[number]

    def _locate(self, image_id: str) -> tuple[int, int]:
        try:
            row = self._index[image_id]
        except KeyError:
            raise KeyError(f"annotation store {self.path} has no image id {image_id!r}") from None
        number = bisect.bisect_right(self._starts, row) - 1
        return number, row - self._starts[number]

    def get(self, image_id: str) -> dict[str, Any]:
        """The annotation of one image: ``cluster`` (int), ``box`` (float32 [4]), ``mask`` (uint8 [h, w]),
        ``multi_hot`` (float32 [K]); which of them depends on :attr:`granularity`."""
        number, row = self._locate(image_id)
        shard = self._shard(number)
        out: dict[str, Any] = {}
        for name in FIELDS[self.granularity]:
            value = shard[name][row]
            out[name] = int(value) if name == "cluster" else value
        return out

    def segmenter(self):
        """The self-segmentation f that made this store's masks
        (:class:`~sgdm.annotation.stego.Segmenter`), or None (ground truth, or a store written
        before f was kept)."""
        name = self.manifest.get("segmenter")
        if name is None:
            return None
        from sgdm.annotation.stego import Segmenter

        if not (self.path / name).is_file():
            raise FileNotFoundError(f"annotation store {self.path}: segmenter file {name} is missing")
        return Segmenter.load(self.path / name)

    def settings_differ(self, annotation) -> list[str]:
        """Dotted keys of ``annotation`` (an :class:`~sgdm.annotation.config.AnnotationConfig`, with
        the store's granularity) whose values differ from those the store was made with; only keys
        that change what the store holds count (not batch sizes, devices or the store path).
        Settings added since the store was written count at their defaults (``stego.crf`` off), except
        ``stego.mask_size``: such a store's masks are at the patch grid (0), and an enabled CRF's
        ``normalization``: it summed raw messages (``none``). Nested settings are
        named to the leaf (``stego.crf.alpha``); those of a disabled CRF are not compared. Two
        ``stego.mask_size`` values that draw the same grid are the same (:meth:`_same_mask_grid`)."""
        from sgdm.annotation.config import AnnotationConfig, CRFConfig
        from sgdm.config.core import from_dict, to_dict

        old = self.manifest.get("params")
        if old is None:
            return ["params (the manifest does not record them)"]
        old = {k: v for k, v in old.items() if k != "store"}
        if isinstance(old.get("stego", {}), dict):  # stores made before stego.mask_size hold patch-grid masks
            old["stego"] = {"mask_size": 0, **old.get("stego", {})}
            crf = old["stego"].get("crf")
            if isinstance(crf, dict) and crf.get("enabled"):  # and before crf.normalization, raw message sums
                old["stego"]["crf"] = {"normalization": "none", **crf}
        old = to_dict(from_dict(AnnotationConfig, old, "annotation"))
        new = to_dict(annotation)
        skip = {"store", "batch_size", "num_workers", "device", "precision", "shard_size", "weights"}
        skip |= {"lost", "stego"} - {"box": {"lost"}, "mask": {"stego"}}.get(self.granularity, set())
        if self.source == "gt":
            skip |= {"backbone", "backbone_kwargs", "image_size", "seed", "kmeans", "lost", "stego"}
        old["granularity"] = new["granularity"] = self.granularity  # `annotate(cfg, granularity)` may override it
        for params in (old, new):  # the settings of a CRF that does not run change nothing: count the defaults
            crf = params.get("stego", {}).get("crf")
            if isinstance(crf, dict) and not crf.get("enabled"):
                params["stego"]["crf"] = to_dict(CRFConfig())
        differ = []
        for key in sorted(set(old) | set(new)):
            if key in skip:
                continue
            a, b = old.get(key), new.get(key)
            if isinstance(a, dict) and isinstance(b, dict) and key != "backbone_kwargs":
                a, b = dict(_leaves(a, key)), dict(_leaves(b, key))
                skip_inner = {"chunk_elements"}  # memory per step, not the result
                differ += [k for k in sorted(set(a) | set(b))
                           if k.rsplit(".", 1)[-1] not in skip_inner and a.get(k) != b.get(k)]
            elif a != b:
                differ.append(key)
        if "stego.mask_size" in differ and self._same_mask_grid(old["stego"]["mask_size"], new["stego"]["mask_size"]):
            differ.remove("stego.mask_size")
        if self.source == "self" and annotation.weights is not None and self._weights_changed(annotation.weights):
            differ.append("weights (file content)")
        return differ

    def _same_mask_grid(self, made_with: int, asked: int) -> bool:
        """Whether ``stego.mask_size`` ``asked`` draws the masks at the grid this store's were drawn at
        (``made_with``): a size no finer than the patch grid gives the grid, and one past the image side
        is clamped to it, so e.g. 64 and 32 are the same on 32-pixel images. False where the manifest
        does not record the grids (``mask_hw``, ``patch_grid``)."""
        hw, grid = self.manifest.get("mask_hw"), self.manifest.get("patch_grid")
        if not hw or not grid or hw[0] != hw[1] or grid[0] != grid[1]:
            return False
        side, patch = hw[0], grid[0]
        if side == patch:  # drawn at the patch grid
            return asked <= patch
        if made_with > side:  # clamped to the image side, which is therefore `side`
            return asked >= side
        return asked == side

    def _weights_changed(self, weights) -> bool:
        """Whether the encoder file at ``weights`` is not the one the store's features came from
        (a re-pretrained encoder at the same path); False where the store records no file hash."""
        from sgdm.annotation.features import file_sha256

        recorded = (self.manifest.get("extractor") or {}).get("weights_sha256")
        path = pathlib.Path(weights)
        if not recorded or recorded.startswith(("hub:", "random")) or not path.is_file():
            return False
        return file_sha256(path) != recorded

    def annotated(self) -> torch.Tensor:
        """[n] bool in :attr:`ids` order: False for the rows with the no-annotation marker
        (``cluster == NO_ANNOTATION``, box stores only), True elsewhere."""
        if self.granularity != "box":
            return torch.ones(len(self), dtype=torch.bool)
        return self.tensor("cluster") != NO_ANNOTATION

    def tensor(self, name: str) -> torch.Tensor:
        """Field ``name`` of every image, in :attr:`ids` order."""
        if name not in FIELDS[self.granularity]:
            raise KeyError(f"annotation store {self.path} ({self.granularity}) has no field {name!r}")
        return torch.cat([self._shard(i)[name] for i in range(len(self.manifest["shards"]))])

    def replaced(self, ids: Sequence[str], sizes: Sequence[Sequence[Optional[int]]]) -> Optional[list[str]]:
        """The stored images whose files now have other sizes than when annotated: ``sizes[i]`` are those
        of ``ids[i]`` now (:func:`sgdm.data.files.item_sizes`); ids the store lacks, and stored ids not in
        ``ids``, are not compared (the id check's). None for a store that records no sizes (an older
        sgdm's, or one of a dataset without files)."""
        recorded = self.manifest.get("file_sizes")
        if recorded is None:
            return None
        now = {str(i): list(s) for i, s in zip(ids, sizes, strict=True)}
        return [i for i, s in zip(self.ids, recorded, strict=True) if i in now and now[i] != list(s)]

    def check_matches(self, ids: Sequence[str], num_classes: Optional[int] = None) -> None:
        """Refuse a store that lacks some of ``ids`` or was made with another K."""
        if num_classes is not None and int(num_classes) != self.num_classes:
            raise StoreMismatchError(
                f"annotation store {self.path} has K={self.num_classes} classes, the model expects {num_classes}; "
                "re-run `sgdm-ldm annotate` with the matching K or fix model.guidance.num_classes"
            )
        missing = [i for i in ids if i not in self._index]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            raise StoreMismatchError(
                f"annotation store {self.path} lacks {len(missing)} of the dataset's {len(ids)} image ids "
                f"(e.g. {shown}); it was made for another dataset (ids sha256 {self.manifest.get('ids_sha256', '?')[:12]})"
            )
