"""Resumable self-segmentation (``granularity: mask``): what survives a crash of stage 2 besides the features.

Beside the feature shards in ``STORE/work`` (the :class:`~sgdm.annotation.cache.FeatureCache`
directory), written atomically and each with an *identity* in its metadata (everything its content
depends on: the features -- the cache's fingerprint and every shard's metadata --, the settings, the
caller's generator state, the number of ranks):

* :data:`HEAD_FILE` (:class:`HeadCheckpoint`): the STEGO head's training state every ``every``
  steps and after the last one (weights, Adam's moments, the step, the state of the generator at
  the start of that epoch and every rank's partner generator), so that rerunning the same command
  continues at that step and ends with the weights an uninterrupted run ends with (bit for bit on
  the same device and software; on another device, a valid continuation);
* :data:`SEGMENTER_FIT_FILE`: the fitted f (head and centroids), saved before any mask is assigned;
* :data:`MASKS_DIR` (:class:`MaskChunks`): the class maps, ``rows`` images a file.

A file made with another identity, or one that cannot be read (cut short by a copy, a full disk),
is not used, with a log line naming it and why. The fitted f and the mask chunks are then
overwritten as the run goes on: they are quick to make again from the head. A readable head
checkpoint is kept beside :data:`HEAD_FILE` instead, named by its identity and step (hours of
training, which a run with fewer epochs or other settings cannot continue but a later run with
its settings reads or continues, see :class:`HeadCheckpoint`). Refusing would leave the user
nothing to do but move the files by hand. (The feature cache refuses instead: features are the
expensive part, and a changed fingerprint there is more likely a mistake.)

Under ``torch.distributed`` rank 0 alone reads a checkpoint and sends it to the other ranks
(:func:`from_rank0`): one decision, whatever a rank's view of a network file system.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Callable, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from sgdm.annotation.ranks import RankFailed
from sgdm.annotation.store import save_tensors_atomic

__all__ = ["HEAD_FILE", "SEGMENTER_FIT_FILE", "MASKS_DIR", "HeadCheckpoint", "MaskChunks", "digest",
           "tensor_digest", "from_rank0", "load_fitted", "save_fitted", "remove_intermediates"]

HEAD_FILE = "stego_head.safetensors"
SEGMENTER_FIT_FILE = "fitted_segmenter.safetensors"
MASKS_DIR = "masks"

Log = Optional[Callable[[str], None]]


def _normal(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` as JSON reads it back (tuples as lists, paths as strings), so that saved and fresh compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def digest(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():  # the tensor's own buffer: no bytes copy of it (hashed at every start: the CLS features)
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclasses.dataclass
class _Failed:
    """What rank 0 sends in place of a value when ``fn`` raised (see :func:`from_rank0`)."""

    message: str


def from_rank0(fn: Callable[[], Any], rank: int, world: int, what: str = "reading a checkpoint") -> Any:
    """``fn()`` (doing ``what``) run on rank 0 and sent to every rank (just ``fn()`` outside a process group).
    Where it raises, rank 0 raises its error and the others :class:`~sgdm.annotation.ranks.RankFailed`
    naming it, instead of waiting for a value that never comes."""
    if world == 1:
        return fn()
    import torch.distributed as dist

    error = None
    box: list = [None]
    if rank == 0:
        try:
            box[0] = fn()
        except BaseException as err:  # noqa: BLE001 - sent to the others, then raised again
            error, box[0] = err, _Failed(f"{type(err).__name__}: {err}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if isinstance(box[0], _Failed):
        raise RankFailed(f"annotate: another rank failed {what}: rank 0 of {world} raised {box[0].message}; "
                         f"this one stops too")
    return box[0]


_UNREADABLE = (SafetensorError, OSError, KeyError, ValueError)  # what _header raises for a file it cannot read


def _header(path: pathlib.Path) -> tuple[dict, dict, dict]:
    """``(metadata, identity, {name: (dtype, shape)})`` of the safetensors file at ``path``; one of
    :data:`_UNREADABLE` where it cannot be read or holds no identity (a JSON object)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        shapes = {k: (handle.get_slice(k).get_dtype(), tuple(handle.get_slice(k).get_shape())) for k in handle.keys()}
    identity = json.loads(metadata["identity"])
    if not isinstance(identity, dict):
        raise ValueError(f"identity {identity!r} is not a JSON object")
    return metadata, identity, shapes


def _read(path: pathlib.Path, identity: Mapping[str, Any], what: str, log: Log, tensors: bool = True):
    """``(tensors, metadata)`` of the safetensors file at ``path`` if it exists, can be read and was made
    with ``identity``; else None, saying why through ``log`` (nothing where there is no file). Without
    ``tensors``, ``(dtype, shape)`` of each tensor in place of its values."""
    if not path.is_file():
        return None
    try:
        metadata, saved, found = _header(path)
        if tensors:
            found = load_file(str(path))
    except _UNREADABLE as err:
        if log is not None:
            log(f"annotate: not using {path}: it cannot be read ({type(err).__name__}: {err}); {what} from the start")
        return None
    changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if changed:
        if log is not None:
            log(f"annotate: not using {path}: it was made with other {', '.join(changed)} than this run; "
                f"{what} from the start")
        return None
    return found, metadata


@dataclasses.dataclass
class _Head:
    """What a head checkpoint's metadata says: its ``identity``, its ``step`` and the ``total`` steps of the
    run that wrote it (None in files of an older sgdm: counted as finished)."""

    path: pathlib.Path
    identity: dict
    step: Optional[int]
    total: Optional[int]

    @property
    def finished(self) -> bool:
        return self.total is None or self.step == self.total


def _count(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _differences(saved: Mapping[str, Any], own: Mapping[str, Any]) -> str:
    """The identity keys that differ (settings one level down, ``stego.lr``), then the values of the
    short ones (not the digests): ``stego.lr than this run (0.0005 there, 0.001 here)``."""
    names, values = [], []
    for key in sorted(set(saved) | set(own)):
        a, b = saved.get(key), own.get(key)
        pairs = [(f"{key}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b))] \
            if isinstance(a, dict) and isinstance(b, dict) else [(key, a, b)]
        for name, x, y in pairs:
            if x != y:
                names.append(name)
                if not any(isinstance(v, (str, list, dict)) and len(v) > 16 for v in (x, y)):
                    values.append(f"{name} {x!r} there, {y!r} here")
    return f"{', '.join(names)} than this run" + (f" ({'; '.join(values)})" if values else "")


class HeadCheckpoint:
    """Where and how often :func:`~sgdm.annotation.stego.train_head` saves its state: the file ``path``,
    every ``every`` steps and after the last; ``identity``, what the caller knows the training depends on
    and the head cannot see (annotate: the features' fingerprint and shard metadata); ``log`` says what
    was resumed, kept or why a file was not used.

    A head in ``path`` that a run would overwrite without continuing it -- made with other settings or
    inputs, trained further than the run trains (a longer run's, finished or not), or finished and
    trained on by a longer run -- is kept beside it, as ``<stem>.<identity digest>.step<step><suffix>``
    (:meth:`kept`), never destroyed: a later run whose settings match resumes from it (the kept head of
    its identity with the most steps up to its own total; read as it is where that is its total).
    Every head of one identity lies on one trajectory (the settings but ``epochs``: epochs only decide
    where it stops), so a longer run continues a shorter one's finished head."""

    def __init__(self, path, identity: Optional[Mapping[str, Any]] = None, every: int = 200, log: Log = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"HeadCheckpoint: every must be an integer >= 1 (steps between checkpoints), got {every!r}")
        self.path, self.every, self.log = pathlib.Path(path), every, log
        self.identity = _normal(identity or {})

    def _identity(self, key: Mapping[str, Any]) -> dict[str, Any]:
        return _normal({**self.identity, **key})

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    def kept(self) -> list[pathlib.Path]:
        """The heads kept beside ``path`` (see the class docstring)."""
        return sorted(self.path.parent.glob(f"{self.path.stem}.*.step*{self.path.suffix}"))

    def _describe(self, path: pathlib.Path) -> Optional[_Head]:
        """The metadata of the head checkpoint at ``path``; None where there is none or it cannot be read
        (said through ``log``: such a file holds nothing to keep)."""
        if not path.is_file():
            return None
        try:
            metadata, identity, _ = _header(path)
        except _UNREADABLE as err:
            self._say(f"annotate: not using {path}: it cannot be read ({type(err).__name__}: {err})")
            return None
        head = _Head(path, identity, _count(metadata.get("step")), _count(metadata.get("total")))
        if head.step is None:
            self._say(f"annotate: not using {path}: its metadata holds no step count (step {metadata.get('step')!r})")
            return None
        return head

    def _keep(self, head: _Head, why: str) -> _Head:
        """Move ``head`` (the file at ``path``) aside under its identity and step, saying ``why``."""
        kept = self.path.with_name(f"{self.path.stem}.{digest(head.identity)[:12]}.step{head.step}{self.path.suffix}")
        os.replace(head.path, kept)
        self._say(f"annotate: {why}; kept it as {kept}")
        return dataclasses.replace(head, path=kept)

    def load(self, key: Mapping[str, Any], total: int) -> Optional[tuple[int, dict[str, torch.Tensor], pathlib.Path]]:
        """``(step, tensors, file)`` saved with this identity and ``key`` (the head's own settings) at a step up
        to ``total``, in ``path`` or a kept head (the one with most steps; ``file`` says which), or None:
        training starts over.
        Before the run writes, a head in ``path`` it would overwrite without continuing it is kept."""
        own = self._identity(key)
        current, kept = self._describe(self.path), self.kept()
        found = self.path.is_file() or bool(kept)
        usable = [h for h in [current, *map(self._describe, kept)]
                  if h is not None and h.identity == own and h.step <= total]
        source = max(usable, key=lambda h: (h.step, h.path == self.path), default=None)
        trains = source is None or source.step < total  # writes checkpoints to path
        if current is not None and trains and not (source is current and not current.finished):
            why = (f"not using {self.path}: it was made with other {_differences(current.identity, own)}"
                   if current.identity != own else
                   f"not using {self.path}: it holds step {current.step}, this run trains {total} steps"
                   if current.step > total else
                   f"the STEGO head in {self.path} is trained ({current.step} steps) and this run trains it on "
                   f"to {total}")
            moved = self._keep(current, why)
            source = moved if source is current else source
        if source is None:
            if found:  # heads there, none of them this run's
                self._say("annotate: training the STEGO head from the start")
            return None
        if trains and source.path != self.path and not source.finished:  # a kept run's state: continued in path
            os.replace(source.path, self.path)
            self._say(f"annotate: continuing the STEGO head kept as {source.path} in {self.path}")
            source = dataclasses.replace(source, path=self.path)
        tensors = load_file(str(source.path))
        self._say(f"annotate: STEGO head already trained ({total} steps), read from {source.path}" if not trains
                  else f"annotate: resuming STEGO head training at step {source.step} of {total} from {source.path}")
        return source.step, tensors, source.path

    def save(self, key: Mapping[str, Any], step: int, tensors: Mapping[str, torch.Tensor], total: int) -> None:
        """Write the state after ``step`` of a run of ``total`` steps (atomically)."""
        save_tensors_atomic(self.path, tensors, {"identity": json.dumps(self._identity(key)), "step": str(step),
                                                 "total": str(total)})


@dataclasses.dataclass
class MaskChunks:
    """Class maps of rows ``[c rows, (c + 1) rows)`` in ``directory/masks_{c:05d}.safetensors`` (key ``mask``),
    each written whole as soon as it is assigned; ``identity``: what they depend on besides ``rows`` (see
    :func:`~sgdm.annotation.stego.segment`, which adds the segmenter and the assignment's settings)."""

    directory: pathlib.Path
    identity: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rows: int = 256
    log: Log = None

    def __post_init__(self):
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1:
            raise ValueError(f"MaskChunks: rows must be an integer >= 1 (images a file), got {self.rows!r}")
        self.directory = pathlib.Path(self.directory)
        # the rows a file holds: chunk c of another size may have the same shape (the last, short one) and other images
        self.identity = _normal({**self.identity, "chunk_rows": self.rows})

    def bind(self, key: Mapping[str, Any]) -> "MaskChunks":
        """These chunks with ``key`` added to their identity."""
        return dataclasses.replace(self, identity={**self.identity, **key})

    def path(self, chunk: int) -> pathlib.Path:
        return self.directory / f"masks_{chunk:05d}.safetensors"

    def span(self, chunk: int, n: int) -> tuple[int, int]:
        return chunk * self.rows, min(n, (chunk + 1) * self.rows)

    def finished(self, n: int, hw: tuple[int, int]) -> list[int]:
        """The chunks of ``n`` rows whose file holds their ``[rows, *hw]`` uint8 maps made with this identity."""
        done, other = [], []
        for c in range(-(-n // self.rows)):
            found = _read(self.path(c), self.identity, "", None, tensors=False)
            lo, hi = self.span(c, n)
            if found is not None and found[0].get("mask") == ("U8", (hi - lo, *hw)):
                done.append(c)
            elif self.path(c).is_file():
                other.append(c)
        if other and self.log is not None:
            self.log(f"annotate: assigning {len(other)} mask chunk(s) again: their files cannot be read or were made "
                     f"by another segmenter or settings, e.g. {self.path(other[0])}")
        return done

    def save(self, chunk: int, masks: torch.Tensor) -> None:
        save_tensors_atomic(self.path(chunk), {"mask": masks}, {"identity": json.dumps(self.identity)})

    def load(self, chunk: int) -> torch.Tensor:
        return load_file(str(self.path(chunk)))["mask"]


def load_fitted(path: pathlib.Path, identity: Mapping[str, Any], log: Log):
    """The :class:`~sgdm.annotation.stego.Segmenter` saved at ``path`` with ``identity``, or None."""
    from sgdm.annotation.stego import Segmenter

    if _read(path, _normal(identity), "fitting the segmenter", log) is None:
        return None
    segmenter = Segmenter.load(path)
    if log is not None:
        log(f"annotate: reusing the fitted segmenter (STEGO head and centroids) in {path}")
    return segmenter


def save_fitted(segmenter, path: pathlib.Path, identity: Mapping[str, Any]) -> None:
    """Save ``segmenter`` (atomically) with ``identity`` in its metadata, for :func:`load_fitted`."""
    segmenter.save(path, metadata={"identity": json.dumps(_normal(identity))})


def remove_intermediates(directory: pathlib.Path) -> None:
    """Delete the fitted segmenter and the mask chunks under ``directory`` (both are in the finished store),
    and the temporaries of their writes and of the head checkpoint's that a killed process left.
    The head checkpoint stays, as the feature shards do: a rerun with another K, k-means, mask size or
    CRF reuses the trained head."""
    directory = pathlib.Path(directory)
    (directory / SEGMENTER_FIT_FILE).unlink(missing_ok=True)
    # writes of the fitted f or of a head checkpoint that a killed process left (sgdm.atomic's temporaries):
    # nothing reads them, and the head's is its size (8 MB at ViT-B/16) per crash
    for name in (SEGMENTER_FIT_FILE, HEAD_FILE):
        for path in directory.glob(f".{name}.*.tmp"):
            path.unlink(missing_ok=True)
    masks = directory / MASKS_DIR
    if masks.is_dir():
        # the chunks, and the temporaries a killed writer leaves (sgdm.atomic's ".<name>.<pid>.tmp")
        for path in [*masks.glob("masks_*.safetensors"), *masks.glob(".masks_*.safetensors.*.tmp")]:
            path.unlink(missing_ok=True)
        try:
            masks.rmdir()
        except OSError:  # a file of someone else's there: keep it
            pass
