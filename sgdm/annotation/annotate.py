"""``annotate(cfg, granularity, evaluate)``: dataset -> features (g) -> self-annotation (f) -> store.

Stages (paper Sec. 3.2, Eq. 6):

1. feature extraction, shard by shard into ``STORE/work`` (resumable; with
   torchrun each rank takes every world-size-th shard). A rerun refuses features
   made with another backbone or other pixels (``data.root``, ``data.size``, ...;
   see :mod:`sgdm.annotation.cache`) and extracts again a shard whose image
   files changed (a repaired bad file) or that an older sgdm wrote in another
   feature format;
2. the self-annotation function: k-means on L2-normalised CLS features
   (``label``; its centroids, f, are saved with the store,
   :mod:`sgdm.annotation.centroids`), LOST boxes plus k-means cluster ids
   (``box``; centroids saved too), or STEGO /
   patch k-means class maps (``mask``; codes upsampled bilinearly to
   ``annotation.stego.mask_size``, clamped to [patch grid, image side]; with
   ``annotation.stego.crf``, refined by a dense CRF on the images, read again
   a batch at a time); k-means and the STEGO head's training run
   data-parallel across ranks (the cluster probe is fitted on rank 0, every
   rank assigns a share of the images). ``mask`` resumes too, by rerunning
   the same command (:mod:`sgdm.annotation.resume`): the head's training from
   its last checkpoint in ``STORE/work``, the fitted f saved there before any
   mask is assigned, and the masks a chunk of images at a time;
3. rank 0 writes the store (:mod:`sgdm.annotation.store`) and, with
   ``evaluate``, scores it against whatever ground truth the dataset has; the
   other ranks wait for it (up to :data:`WAIT_TIMEOUT`, not torch's default).
   A complete store of another granularity or source at ``annotation.store``
   is refused, never replaced.

``source: gt`` skips 1-2 and fills the store from ground truth instead (rank 0 alone).
Images are read with ``train=False``: annotations describe the unflipped image.

Memory: stage 2 holds every image's CLS feature (float16; on every rank for
``mask``, for the STEGO partners). Patch features (``mask``: N x h x w x D x 2
bytes, 35 GB for COCO's 118k images at ViT-B/16) are never loaded whole: they
are read from the memory-mapped shards a batch at a time
(:class:`~sgdm.annotation.patches.ShardPatches`); the class maps (N x h x w
bytes) are gathered on rank 0. Feature shards stay in ``STORE/work`` so that
re-clustering with another K or method skips extraction, and so does the STEGO
head's last checkpoint (a rerun with another K, k-means, mask size or CRF skips
its training); the fitted f and the mask chunks there are deleted once the
store holds them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import sys
from typing import Any, Callable, Optional

import torch

from sgdm.annotation.cache import FEATURE_FORMAT, FeatureCache, file_stamps
from sgdm.annotation.centroids import CENTROIDS_FILE, ClusterF, prepare
from sgdm.annotation.config import AnnotationConfig
from sgdm.annotation.evaluate import evaluate_records
from sgdm.annotation.features import extract, extraction_precision, file_sha256, load_backbone
from sgdm.annotation.ground_truth import GroundTruthCollector, ground_truth_records, pack_gt
from sgdm.annotation.kmeans import kmeans_from_config
from sgdm.annotation.lost import lost_feature_flags, lost_from_features
from sgdm.annotation.patches import ShardPatches
from sgdm.annotation.ranks import Failures, RankFailed
from sgdm.annotation.resume import (HEAD_FILE, MASKS_DIR, SEGMENTER_FIT_FILE, HeadCheckpoint, MaskChunks, digest,
                                    from_rank0, load_fitted, remove_intermediates, save_fitted)
from sgdm.annotation.stego import fit_segmenter, segment
from sgdm.annotation.store import MANIFEST, SEGMENTER_FILE, ids_hash, write_store
from sgdm.config.core import ConfigError, to_dict
from sgdm.data.decode import printable
from sgdm.devices import resolve_device
from sgdm.launch import rank_world

__all__ = ["AnnotationResult", "RankFailed", "annotate", "class_count", "data_settings"]


@dataclasses.dataclass
class AnnotationResult:
    """What :func:`annotate` returns: ``store``, the annotation store's directory (open it with
    :meth:`AnnotationStore.open <sgdm.annotation.store.AnnotationStore.open>`); ``granularity``
    (``label``, ``box`` or ``mask``); ``num_images`` annotated; ``metrics``, the scores against the
    dataset's ground truth (NMI, ARI, purity, CorLoc, mIoU, ...; empty unless ``evaluate``)."""

    store: pathlib.Path
    granularity: str
    num_images: int
    metrics: dict[str, float]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def class_count(a: AnnotationConfig, granularity: str) -> tuple[int, str]:
    """K of the store and its config key: box stores use ``lost.num_clusters``."""
    if granularity == "box":
        return a.lost.num_clusters, "annotation.lost.num_clusters"
    return a.num_classes, "annotation.num_classes"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


# How long a rank waits at a barrier for the others: rank 0 alone evaluates and writes the store (a mask
# store's mIoU over 118k maps, its shards on a network file system), and on a resume ranks extract unequal
# numbers of shards; torch.distributed's default (10 minutes for NCCL, then the job is killed) is too short.
WAIT_TIMEOUT = datetime.timedelta(hours=12)


@contextlib.contextmanager
def _waits():
    """A group of every rank whose collectives time out after :data:`WAIT_TIMEOUT`, for annotate's barriers
    (None outside a process group); the default group keeps its timeout for the collectives of the work."""
    dist = _dist()
    if dist is None:
        yield None
        return
    group = dist.new_group(timeout=WAIT_TIMEOUT)
    try:
        dist.barrier(group=group)  # NCCL makes a group's communicator at its first collective: now, every rank here
        yield group
    finally:
        dist.destroy_process_group(group)


@contextlib.contextmanager
def _together(waits, device: torch.device, what: str):
    """Run the block (``what`` this rank does in it), then wait for every rank on ``waits`` (see
    :data:`WAIT_TIMEOUT`; no wait outside a process group). A rank whose block raised makes the others
    raise :class:`~sgdm.annotation.ranks.RankFailed`, naming it and its error, instead of waiting for it
    until the timeout."""
    failures = Failures(what, device, distributed=waits is not None, group=waits)
    with failures.held():
        yield
    failures.settle()


def _device(a: AnnotationConfig) -> torch.device:
    return resolve_device(a.device, "annotation.device")


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.indices[i], self.dataset[self.indices[i]]


def _samples(dataset, indices, a: AnnotationConfig):
    """Batches of ``(dataset index, sample)`` pairs; unreadable (None) samples are dropped."""
    loader = torch.utils.data.DataLoader(_Indexed(dataset, indices), batch_size=a.batch_size,
                                         num_workers=a.num_workers, collate_fn=list)
    for batch in loader:
        kept = [(i, s) for i, s in batch if s is not None]
        if kept:
            yield kept


def _extract_shard(backbone, dataset, indices, a, granularity, device, precision: str, bar) -> dict[str, torch.Tensor]:
    rows, cls, boxes, patches, samples = [], [], [], [], []
    image_hw = None
    for kept in _samples(dataset, indices, a):
        images = torch.stack([s["image"] for _, s in kept]).to(device)
        lost = lost_feature_flags(a.lost) if granularity == "box" else {"keys": False, "patches": False}
        feats = extract(backbone, images, keys=lost["keys"], patches=granularity == "mask" or lost["patches"],
                        bf16=precision == "bf16")
        rows += [i for i, _ in kept]
        cls.append(feats.cls.half().cpu())
        if granularity == "box":
            boxes.append(lost_from_features(feats, a.lost))
        if granularity == "mask":
            patches.append(feats.patches.half().cpu())
        samples += [{k: v for k, v in s.items() if k.startswith("gt_")} for _, s in kept]
        bar.update(len(kept))
        if image_hw is None:
            image_hw = torch.tensor(images.shape[-2:])
    out = {"index": torch.tensor(rows, dtype=torch.long)}
    if rows:
        out.update(cls=torch.cat(cls), image_hw=image_hw, **pack_gt(samples))
        if boxes:
            out["box"] = torch.cat(boxes)
        if patches:
            out["patches"] = torch.cat(patches)
    return out


class _DatasetImages:
    """The images ``[B, 3, H, W]`` in [-1, 1] of dataset rows ``indices``, read again a slice at a time
    as feature extraction read them (the CRF refines masks on the images the features came from)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: slice) -> torch.Tensor:
        images = []
        for i in self.indices[index]:
            sample = self.dataset[i]
            if sample is None:  # readable when its features were extracted
                raise ValueError(f"annotate: image {printable(self.dataset.ids[i])} (dataset index {i}) can no longer "
                                 "be read; it was read when its features were extracted (a file changed since?)")
            images.append(sample["image"])
        return torch.stack(images)


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    parts = [p for p in parts if p["index"].numel()]
    if not parts:
        raise ValueError("annotate: no image of the dataset could be read")
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "image_hw"}
    out["image_hw"] = parts[0]["image_hw"]
    return out


# data settings that never change the cached tensors: the ids hash covers max_images, annotation
# reads unflipped images, and on_bad_image only decides whether a bad file stops the run
_DATA_SETTINGS_NOT_IN_FEATURES = ("flip", "on_bad_image", "num_workers", "max_images", "shapes")


def data_settings(data) -> dict[str, Any]:
    """``data.*`` keys that decide the pixels (and ground truth) of each id, paths made absolute
    (a relative root means another folder when run from elsewhere). Keys added since records were
    first written appear only away from the value older records imply (``data.exif_orientation``
    only when ``apply``; see :data:`sgdm.data.config.ADDED_KEYS`), so those records stay valid."""
    from sgdm.data.config import recorded_data

    settings = {k: v for k, v in recorded_data(data).items() if k not in _DATA_SETTINGS_NOT_IN_FEATURES}
    for key in ("root", "list_file", "annotation_file", "class_list", "val_labels"):
        if settings.get(key) is not None:
            settings[key] = os.path.abspath(settings[key])
    out = {f"data.{k}": v for k, v in settings.items()}
    if data.dataset == "shapes":  # drawn from a seed, not read from files
        out.update({"data.shapes.seed": data.shapes.seed, "data.shapes.image_size": data.shapes.image_size})
    return out


def _fingerprint(backbone, a: AnnotationConfig, granularity: str, dataset_ids, data) -> dict[str, Any]:
    return {
        **data_settings(data),
        "backbone": backbone.name,
        "backbone_kwargs": a.backbone_kwargs,
        "weights": backbone.weights_id,
        "input_size": list(backbone.input_size),
        "ids_sha256": ids_hash(dataset_ids),
        "shard_size": a.shard_size,
        "extract": {"label": "cls", "box": f"cls+lost(k={a.lost.k_patches},{a.lost.features}{',centred' if a.lost.center else ''})", "mask": "cls+patches"}[granularity],
    }


_STAMP_NOTICE = 20_000  # files from which stamping them is announced


def _stamps(dataset, indices) -> list:
    """Stamps of the files behind ``indices`` (see :func:`~sgdm.annotation.cache.file_stamps`)."""
    source = getattr(dataset, "source", None)  # a wrapped or in-memory dataset has no files to stamp
    paths = [source(i) if source is not None else "" for i in indices]
    return file_stamps([dataset.ids[i] for i in indices], paths)


def _extract_all(dataset, a, granularity, data, log, progress, waits=None):
    """Features of every shard of this rank (resuming finished ones whose files did not change);
    returns the cache and shard count."""
    from tqdm import tqdm

    backbone = load_backbone(a.backbone, a.weights, a.backbone_kwargs, a.image_size)
    device = _device(a)
    backbone.model.to(device)
    cache = FeatureCache(a.store / "work", _fingerprint(backbone, a, granularity, dataset.ids, data))
    rank, world = rank_world()
    n = len(dataset)
    if -(-n // a.shard_size) < world:  # every rank needs features for the distributed k-means
        raise ConfigError("annotation.shard_size", f"{a.shard_size} leaves {-(-n // a.shard_size)} shards of {n} "
                                                   f"images for {world} ranks; lower it")
    shards = list(range(rank, -(-n // a.shard_size), world))
    indices = {s: range(s * a.shard_size, min(n, (s + 1) * a.shard_size)) for s in shards}
    if rank == 0 and n >= _STAMP_NOTICE:  # one stat a file: minutes without a word on a network file system
        log(f"annotate: checking the size and date of the dataset's {n} image files (to tell a changed file on "
            f"a rerun) ...")
    stamps = {s: _stamps(dataset, indices[s]) for s in shards}  # before reading: a later edit shows next time
    todo = [s for s in shards if not cache.done(s, stamps[s])]
    outdated = [s for s in todo if cache.outdated(s)]
    if outdated:
        log(f"annotate: extracting {len(outdated)} feature shard(s) again: an older sgdm wrote them in another "
            f"feature format (this one writes format {FEATURE_FORMAT})")
    torn = [s for s in todo if cache.unreadable(s)]
    if torn:
        log(f"annotate: extracting {len(torn)} feature shard(s) again: their files cannot be read (cut short by "
            f"a crash or a copy?), e.g. {cache.path(torn[0])}")
    stale = [s for s in todo if cache.path(s).is_file() and s not in outdated and s not in torn]
    if stale:
        log(f"annotate: extracting {len(stale)} feature shard(s) again: their image files changed since "
            f"(replaced or repaired; e.g. {printable(cache.changed(stale[0], stamps[stale[0]]))})")
    if len(todo) < len(shards):
        log(f"annotate: resuming, {len(shards) - len(todo)} of {len(shards)} feature shards already done")
    precision = _check_precision(cache, shards, todo, a, device)
    total = sum(len(indices[s]) for s in todo)
    with _together(waits, device, "extracting features"), \
            tqdm(total=total, desc=f"features ({backbone.name})", unit="img", disable=not progress or rank != 0) as bar:
        for s in todo:  # ranks with fewer shards left (a resume) wait for the others after it
            cache.save(s, _extract_shard(backbone, dataset, indices[s], a, granularity, device, precision, bar),
                       stamps[s], precision)
    return cache, -(-n // a.shard_size), backbone


def _check_precision(cache, shards, todo, a: AnnotationConfig, device: torch.device) -> str:
    """This run's extraction precision (``bf16`` / ``fp32``; ``auto`` is bf16 on CUDA). Refuses to extract
    shards at it beside finished shards made at the other one (a resume on another device or with another
    ``annotation.precision``), on every rank alike; with nothing left to extract, any precision reuses them."""
    precision = extraction_precision(a.precision, device)
    other = sum(cache.precision(s) not in (None, precision) for s in shards if s not in todo)
    counts = torch.tensor([len(todo), other], device=device)
    if _dist() is not None:
        _dist().all_reduce(counts)
    pending, other = (int(c) for c in counts)
    if pending and other:
        made = "fp32" if precision == "bf16" else "bf16"
        raise ConfigError("annotation.precision",
                          f"{other} feature shard(s) in {cache.directory} were extracted at {made}, this run extracts "
                          f"at {precision} (annotation.precision={a.precision} on {device.type}) and {pending} shard(s) "
                          f"are left: set annotation.precision={made} to finish them alike, or delete "
                          f"{cache.directory} to extract every shard again")
    return precision


def _cluster(cache, n_shards, a, k, device, log=None) -> tuple[Optional[torch.Tensor], float, ClusterF]:
    """k-means of the normalised CLS features (:func:`~sgdm.annotation.centroids.prepare`), all ranks together:
    (cluster ids on rank 0, None elsewhere; inertia; f, the centroids, on every rank). ``log`` (rank 0's)
    gets a line before, one per Lloyd iteration and one after. A rank that fails (reading its shards, in the
    k-means, gathering the ids) stops the others with :class:`~sgdm.annotation.ranks.RankFailed`."""
    rank, world = rank_world()
    reading = Failures("reading the CLS features", device, world > 1)
    with reading.held():
        mine = [cache.load(s) for s in range(rank, n_shards, world)]
        if any("cls" in m for m in mine):
            cls = torch.cat([m["cls"] for m in mine if "cls" in m])
        else:  # this rank read no image: no rows, but the others' width (the all-reduces need equal shapes)
            widths = (cache.load(s, keys=("cls",)).get("cls") for s in range(n_shards))
            cls = torch.zeros(0, next((c.shape[1] for c in widths if c is not None), 1))
        x = prepare(cls)  # normalised in place: one float32 copy of the features on the host (3.9 GB at 1.28M x 768)
        del cls
        x = x.to(device)
    reading.settle()
    generator = torch.Generator().manual_seed(a.seed)
    log = log if log is not None and rank == 0 else None
    if log is not None:
        log(f"annotate: k-means of the CLS features into K={k} clusters (at most {a.kmeans.max_iter} iterations"
            f"{', mini-batches of ' + str(a.kmeans.batch_size) if a.kmeans.batch_size else ''}) ...")
    result = kmeans_from_config(x, k, a.kmeans, generator, distributed=world > 1, log=log)
    if log is not None:
        log(f"annotate: k-means done after {result.n_iter} iteration(s), {sum(result.seconds.values()):.1f} s: inertia "
            f"{result.inertia:.6g}")
    gathering = Failures("gathering the cluster ids", device, world > 1)
    labels = None  # what a rank that failed sends
    with gathering.held():
        labels = list(torch.split(result.labels.cpu(), [m["index"].numel() for m in mine]))
    if world > 1:
        gathered = [None] * world
        _dist().all_gather_object(gathered, labels)
        gathering.raise_if(torch.tensor([float(sum(g is None for g in gathered))]))
        if rank != 0:
            return None, result.inertia, ClusterF(result.centroids)
        labels = [gathered[s % world][s // world] for s in range(n_shards)]
    return torch.cat(labels), result.inertia, ClusterF(result.centroids)


def _advance(bar, done: int, total: int) -> None:
    """Show ``done`` of ``total`` on the tqdm ``bar`` (its rate and ETA follow)."""
    bar.total = total
    bar.update(done - bar.n)


def _features_identity(cache, n_shards: int) -> str:
    """A digest of the features a head checkpoint, fitted segmenter or mask chunk was made from: the cache's
    fingerprint and each shard's metadata (its image files' stamps, precision and format, which change when a
    shard is extracted again)."""
    from safetensors import safe_open

    shards = []
    for s in range(n_shards):
        with safe_open(str(cache.path(s)), framework="pt") as handle:
            shards.append(handle.metadata() or {})
    return digest({"fingerprint": cache.fingerprint, "shards": shards})


# steps of STEGO head training between two checkpoints: each costs one write of the head and its Adam moments
# (8 MB at ViT-B/16 and dim 70), and at most this many steps are trained again after a crash
HEAD_CHECKPOINT_STEPS = 200
# images of one mask chunk file: the work lost to a crash (with the dense CRF, ~3 s an image at mask_size 64) and
# what ranks may finish apart; 256 maps of 64x64 are 1 MB
MASK_CHUNK_ROWS = 256


def _fitted_segmenter(work: pathlib.Path, features: str, patches, cls, k: int, stego_cfg, a: AnnotationConfig,
                      generator, device, log, distributed: bool):
    """f for the masks: the one fitted before in ``work`` from the same features and settings, or one fitted
    now (the STEGO head's training checkpointed in ``work``), saved there before any mask is assigned."""
    rank, world = rank_world() if distributed else (0, 1)
    identity = {"features": features, "num_classes": k, "stego": to_dict(stego_cfg), "kmeans": to_dict(a.kmeans),
                "seed": a.seed, "world_size": world}
    segmenter = from_rank0(lambda: load_fitted(work / SEGMENTER_FIT_FILE, identity, log), rank, world,
                           "reading the fitted segmenter")
    if segmenter is None:
        checkpoint = HeadCheckpoint(work / HEAD_FILE, {"features": features}, HEAD_CHECKPOINT_STEPS, log)
        segmenter = fit_segmenter(patches, cls, k, stego_cfg, a.kmeans, generator, device, log, distributed,
                                  checkpoint=checkpoint)
        failures = Failures("saving the fitted segmenter", device, distributed)
        with failures.held():  # rank 0 writes it: a failed write stops the others here
            if rank == 0:
                save_fitted(segmenter, work / SEGMENTER_FIT_FILE, identity)
        failures.settle()
    return segmenter


def _self_records(cache, n_shards, a, granularity, log, dataset,
                  progress: bool = False, waits=None) -> tuple[Optional[dict], Optional[dict], dict]:
    device = _device(a)
    k, key = class_count(a, granularity)
    readable = sum(cache.load(s, keys=("index",))["index"].numel() for s in range(n_shards))
    if granularity != "mask" and k > readable:  # annotate() checked the dataset's size; some were unreadable
        raise ConfigError(key, f"K={k} clusters is more than the {readable} images that could be read "
                               f"({len(dataset) - readable} of the dataset's {len(dataset)} could not)")
    extra: dict[str, Any] = {}
    if granularity in ("label", "box"):
        cluster, inertia, f = _cluster(cache, n_shards, a, k, device, log)
        extra.update(method="kmeans" if granularity == "label" else "lost+kmeans", kmeans_inertia=inertia)
        if cluster is None:
            return None, None, extra
        # f goes with the store: cluster adherence assigns samples with it (written before the manifest, and an
        # older store's manifest goes first, so that its clusters are never read beside the new f)
        pathlib.Path(a.store).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(a.store) / MANIFEST).unlink(missing_ok=True)
        saved = f.save(pathlib.Path(a.store) / CENTROIDS_FILE)
        extra.update(centroids=saved.name, centroids_sha256=file_sha256(saved))
    if granularity == "mask":  # every rank: patch features stay on disk, read a batch at a time
        patches = ShardPatches([cache.path(s) for s in range(n_shards)])
        if k > len(patches) * patches.shape[1] * patches.shape[2]:  # the probe clusters patches into K classes
            raise ConfigError(key, f"K={k} segment classes is more than the "
                                   f"{len(patches) * patches.shape[1] * patches.shape[2]} patches of the "
                                   f"{len(patches)} image(s) that could be read")
        loaded = [cache.load(s, keys=("cls", "image_hw", "index")) for s in range(n_shards)]
        cls = torch.cat([t["cls"] for t in loaded if "cls" in t])
        sides = [min(t["image_hw"].tolist()) for t in loaded if "image_hw" in t]
        if not sides:
            raise ValueError("annotate: no image of the dataset could be read")
        image_side = sides[0]
        stego_cfg = dataclasses.replace(a.stego, mask_size=min(a.stego.mask_size, image_side))  # none finer than the image
        generator = torch.Generator().manual_seed(a.seed)
        distributed = _dist() is not None
        features = _features_identity(cache, n_shards)
        segmenter = _fitted_segmenter(cache.directory, features, patches, cls, k, stego_cfg, a, generator, device, log,
                                      distributed)
        images = None
        if stego_cfg.crf.enabled:  # the rows of the patch features, each rank reading its share
            images = _DatasetImages(dataset, torch.cat([t["index"] for t in loaded]).tolist())
        from tqdm import tqdm

        chunks = MaskChunks(cache.directory / MASKS_DIR, {"features": features}, MASK_CHUNK_ROWS, log)
        with tqdm(desc="masks", unit="img", disable=not progress or rank_world()[0] != 0) as bar:
            masks = segment(patches, cls, k, stego_cfg, a.kmeans, generator, device, log, distributed,
                            segmenter=segmenter, images=images, progress=lambda done, total: _advance(bar, done, total),
                            chunks=chunks, group=waits)
        extra.update(method="stego" if a.stego.method == "stego" else "patch-kmeans",
                     crf=to_dict(a.stego.crf) if a.stego.crf.enabled else False)
        if masks is None:
            return None, None, extra
        extra.update(mask_hw=list(masks.shape[-2:]), patch_grid=list(patches.shape[1:3]))
        # f itself goes with the store: layout adherence segments samples with it (written before the manifest;
        # an older store's manifest goes first, so that its masks are never read beside the new f)
        pathlib.Path(a.store).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(a.store) / MANIFEST).unlink(missing_ok=True)
        extra["segmenter"] = segmenter.save(pathlib.Path(a.store) / SEGMENTER_FILE).name
        return {"mask": masks}, _concat([cache.load(s, exclude=("patches",)) for s in range(n_shards)]), extra
    if rank_world()[0] != 0:
        return None, None, extra
    feats = _concat([cache.load(s) for s in range(n_shards)])
    records = {"cluster": cluster}
    if granularity == "box":
        records["box"] = feats["box"]
    return records, feats, extra


def _check_not_replacing(a: AnnotationConfig, granularity: str) -> None:
    """Refuse to write over a complete store of another granularity or source at ``annotation.store``
    (``--granularity label`` on a box config would replace its box store with one that training refuses).
    A store of the same kind is made again: re-clustering with other settings at the same path."""
    try:
        manifest = json.loads((pathlib.Path(a.store) / MANIFEST).read_text())
        held = (manifest["granularity"], manifest.get("source", "self"))
    except (OSError, ValueError, TypeError, KeyError):
        return  # no store there, or one that cannot be read, which this run replaces
    if held == (granularity, a.source):
        return
    asked = f"annotation.granularity {granularity}" if granularity == a.granularity else \
        f"granularity {granularity} asked instead of annotation.granularity {a.granularity}"
    kind = lambda g, source: f"{g}" if source == "self" else f"ground-truth {g}"  # noqa: E731
    raise ConfigError("annotation.store", f"{a.store} holds {kind(*held)} annotations ({len(manifest.get('ids', []))} "
                                          f"images) and this run makes {kind(granularity, a.source)} annotations "
                                          f"({asked}, annotation.source {a.source}), which would "
                                          f"replace them: point annotation.store at another directory, or delete "
                                          f"{a.store} to replace them")


def _check_gt_classes(dataset, k: int, key: str, granularity: str) -> None:
    """A ground-truth store's K is the dataset's number of classes (of its masks' values for ``mask``),
    checked before any image is read. A larger K would store slots no image ever uses (a
    ``data.class_list`` subset under a config made for all classes) that sampling would accept as classes;
    a smaller one cannot hold the labels. Datasets that name no classes are checked as their values are read."""
    names = getattr(dataset, "mask_class_names" if granularity == "mask" else "class_names", None)
    if not names:
        return
    count = len(names)
    if k > count:
        raise ConfigError(key, f"{k} is more than the dataset's {count} ground-truth classes: {k - count} classes "
                               f"would never be used; set {key}={count} and model.guidance.num_classes={count}")
    if k < count:
        raise ConfigError(key, f"{k} is too small: the dataset has {count} ground-truth classes; set {key}={count} "
                               f"and model.guidance.num_classes={count}")


def _ground_truth(dataset, a, granularity, log, progress):
    from tqdm import tqdm

    rows, image_hw = [], None
    # one uint8 copy of the class maps, written a batch at a time (see GroundTruthCollector); neither the
    # images nor the samples' own (int64) maps are kept; rows of unreadable images stay unused at its end
    collected = GroundTruthCollector(len(dataset))
    with tqdm(total=len(dataset), desc="ground truth", unit="img", disable=not progress) as bar:
        for kept in _samples(dataset, range(len(dataset)), a):
            rows += [i for i, _ in kept]
            collected.add([s for _, s in kept], [dataset.ids[i] for i, _ in kept])
            if image_hw is None:
                image_hw = torch.tensor(kept[0][1]["image"].shape[-2:])
            bar.update(len(kept))
    if not rows:
        raise ValueError("annotate: no image of the dataset could be read")
    gt = collected.packed()
    gt["index"] = torch.tensor(rows)
    gt["image_hw"] = image_hw
    k, _ = class_count(a, granularity)
    ids = [dataset.ids[i] for i in rows]
    records, extra = ground_truth_records(gt, granularity, k, gt["image_hw"].tolist(), ids)
    extra["method"] = "ground-truth"
    empty = extra.get("ids_without_gt_box") or []
    if empty:
        log(f"annotate: {len(empty)} of {len(ids)} images have no ground-truth box after the centre crop (e.g. "
            f"{printable(empty[0])!r}); they are stored without annotation (cluster -1) and train unguided; "
            f"the manifest lists them under ids_without_gt_box")
    return records, gt, extra


def annotate(cfg, granularity: Optional[str] = None, evaluate: bool = False, *, dataset=None,
             log: Callable[[str], None] = _stderr, progress: bool = True) -> AnnotationResult:
    """Annotate ``cfg.data`` per ``cfg.annotation`` (an ExperimentConfig or anything with those two sections).

    ``granularity`` overrides ``annotation.granularity``; ``dataset`` replaces
    ``sgdm.data.build_dataset(cfg.data, train=False)``. Returns the store path,
    the number of images annotated and, with ``evaluate``, the scores (also
    written to the manifest as ``metrics``). Non-zero ranks return empty metrics.
    """
    a: AnnotationConfig = cfg.annotation
    granularity = granularity or a.granularity
    if granularity not in ("label", "box", "mask"):
        raise ConfigError("annotation.granularity", f"expected label, box or mask, got {granularity!r}")
    _check_not_replacing(a, granularity)
    if dataset is None:
        from sgdm.data import build_dataset

        dataset = build_dataset(cfg.data, train=False)
    n = len(dataset)
    if n == 0:
        raise ConfigError("data", f"the dataset ({cfg.data.dataset}, split {cfg.data.split!r}) has no images")
    k, key = class_count(a, granularity)
    if granularity == "mask" and k > 255:  # the config was validated for its own granularity, maybe not mask
        raise ConfigError(key, f"masks are stored as uint8 class maps: at most 255 classes, got {k}")
    if granularity != "mask" and a.source == "self" and k > n:
        raise ConfigError(key, f"K={k} clusters is more than the dataset's {n} images")
    if a.source == "gt":
        _check_gt_classes(dataset, k, key, granularity)
    from sgdm.data.files import item_sizes

    # the store records them (training refuses it once one changed): taken before any image is read, so that a
    # file replaced while it is annotated shows as changed
    sizes = item_sizes(dataset) if rank_world()[0] == 0 else None
    with _waits() as waits:  # every rank waits for the others as long as they work, after extraction and at the end
        if a.source == "gt":  # rank 0 reads it; every rank read the whole dataset and wrote the same store
            records, feats, extra = _ground_truth(dataset, a, granularity, log, progress) if rank_world()[0] == 0 \
                else (None, None, {})
        else:
            cache, n_shards, backbone = _extract_all(dataset, a, granularity, cfg.data, log, progress, waits)
            records, feats, extra = _self_records(cache, n_shards, a, granularity, log, dataset, progress, waits)
            extra["extractor"] = {"backbone": backbone.name, "backbone_kwargs": a.backbone_kwargs,
                                  "weights": str(a.weights) if a.weights else None,
                                  "weights_sha256": backbone.weights_id, "input_size": list(backbone.input_size)}
            made = {cache.precision(s) for s in range(n_shards)}  # a finished cache is reused at any precision
            if len(made) == 1 and None not in made:  # adherence extracts the samples alike
                extra["feature_precision"] = made.pop()
        metrics: dict[str, float] = {}
        with _together(waits, _device(a), "writing the store"):  # rank 0 evaluates and writes it, the others wait
            if records is not None:  # None: a non-zero rank
                ids = [dataset.ids[i] for i in feats["index"].tolist()]
                metrics = _evaluate(records, feats, a, granularity, k, evaluate, log)
                # the settings it was made with: the granularity annotated, also when the call overrode the config's
                extra.update(source=a.source, params=to_dict(dataclasses.replace(a, granularity=granularity)),
                             metrics=metrics, image_size=feats["image_hw"].tolist(),
                             dataset={"config": to_dict(cfg.data), "ids_sha256": ids_hash(dataset.ids), "num_images": n,
                                      "skipped": sorted(set(dataset.ids) - set(ids))})
                write_store(a.store, ids, records, granularity=granularity, num_classes=k, shard_size=a.shard_size,
                            extra=extra, sizes=None if sizes is None else [sizes[i] for i in feats["index"].tolist()])
                if granularity == "mask" and a.source == "self":  # the store holds them now
                    remove_intermediates(pathlib.Path(a.store) / "work")
                log(f"annotate: wrote {len(ids)} {granularity} annotations (K={k}) to {a.store}")
    return AnnotationResult(a.store, granularity, 0 if records is None else len(ids), metrics)


def _evaluate(records, feats, a: AnnotationConfig, granularity: str, k: int, evaluate: bool, log) -> dict[str, float]:
    """The scores of ``records`` against the dataset's ground truth in ``feats`` (none unless ``evaluate``)."""
    if not evaluate:
        return {}
    if a.source == "gt":
        log("annotate: a ground-truth store scores perfectly against itself; nothing to evaluate")
        return {}
    metrics = evaluate_records(granularity, records, feats, k, feats["image_hw"].tolist())
    log("annotate: " + (", ".join(f"{m} {v:.4f}" for m, v in metrics.items()) or "no ground truth to evaluate against"))
    return metrics
