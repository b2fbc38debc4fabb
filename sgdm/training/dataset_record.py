"""What a run's training images were, recorded in its run directory at every start, and what a resume
finds changed since.

Two files: ``dataset.json`` (where the images were, their number, the digest of their ids in order and,
for datasets of files, of the ids with their file sizes: :func:`record`) and ``dataset_files.json.gz``
(the ids and sizes themselves, to name what changed: :func:`write_listing`). A resume compares what
``data.root`` holds now with them (:func:`check_same_images`), at the same path as at a moved one
(:data:`sgdm.training.resume.MOVABLE`): the checkpoint's position counts steps of a data order over
these images, the latent cache's rows and the annotation store's labels are theirs. Cheap: the ids are
listed anyway to build the dataset, and the sizes take one stat per file (:mod:`sgdm.data.files`), no
image is read. Not seen: a file replaced by another of exactly the same byte length.

Every process of a run stats the files itself, and they may see different ones (a network file system
still being copied to, node-local copies that differ): :func:`agree_across_ranks` compares each rank's
record with rank 0's before any of them compares it with the run's or writes it, so that all stop with
the same error, or none does.
"""
from __future__ import annotations

import gzip
import json
import pathlib
import weakref
from typing import Optional, Sequence

from sgdm.config.core import ConfigError

__all__ = ["RECORD", "LISTING", "record", "write_listing", "check_same_images", "describe_change",
           "agree_across_ranks", "same_images_callback"]

RECORD = "dataset.json"
LISTING = "dataset_files.json.gz"
SHOWN = 3  # ids named per kind of change
COMPARED = ("num_images", "ids_sha256", "files_sha256")  # what a record says of the images (not where they are)
_made: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # dataset -> {root: its record}


def record(dataset, root: Optional[pathlib.Path]) -> dict:
    """``dataset.json``'s content for ``dataset`` (the training images) read from ``root`` (data.root).
    Made once per dataset object, like its sizes (:func:`sgdm.data.files.item_sizes`): the ranks' agreement
    and the run's record of one start hash the same snapshot once (0.09 s for 130,000 ids)."""
    from sgdm.annotation.store import ids_hash
    from sgdm.data.files import files_hash, item_sizes

    where = None if root is None else str(root)
    try:
        return dict(_made[dataset][where])
    except (KeyError, TypeError):  # TypeError: not weakly referable
        pass
    held = {"root": where, "num_images": len(dataset.ids), "ids_sha256": ids_hash(dataset.ids)}
    sizes = item_sizes(dataset)
    if sizes is not None:
        held["files_sha256"] = files_hash(dataset.ids, sizes)
    try:
        _made.setdefault(dataset, {})[where] = dict(held)
    except TypeError:
        pass
    return held


def write_listing(run_dir: pathlib.Path, dataset, held: dict) -> None:
    """Write ``LISTING`` (the ids and sizes behind ``held``'s digests) unless it already holds them."""
    from sgdm.atomic import atomic_open
    from sgdm.data.files import item_sizes

    path = run_dir / LISTING
    if _listing_digests(path) == _digests(held):
        return
    # two JSON lines: the digests first, read alone at the next start to see whether to write again
    content = {"ids": [str(i) for i in dataset.ids], "sizes": item_sizes(dataset)}
    text = f"{json.dumps({'digests': _digests(held)})}\n{json.dumps(content)}\n"
    with atomic_open(path, "wb") as fh:
        fh.write(gzip.compress(text.encode(), compresslevel=6, mtime=0))


def _digests(held: dict) -> dict:
    return {k: held.get(k) for k in ("ids_sha256", "files_sha256")}


def _read_listing(path: pathlib.Path, whole: bool = True) -> Optional[dict]:
    """``LISTING``'s content (only its digests unless ``whole``); None when it cannot be read (missing,
    or not ours: the digests of ``RECORD`` alone are compared then)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            head = json.loads(fh.readline())
            return {**head, **json.loads(fh.readline())} if whole else head
    except (OSError, ValueError, EOFError):
        return None


def _listing_digests(path: pathlib.Path) -> Optional[dict]:
    listing = _read_listing(path, whole=False)
    return None if not isinstance(listing, dict) else listing.get("digests")


def _differs(recorded: dict, now: dict) -> bool:
    """Whether ``now`` holds other images than ``recorded`` (each a :func:`record`), by what both record."""
    return any(recorded.get(k) is not None and now.get(k) is not None and recorded[k] != now[k]
               for k in COMPARED)


def describe_change(run_dir: pathlib.Path, recorded: dict, now: dict, dataset) -> str:
    """What differs between the images ``recorded`` in ``run_dir`` and those of ``dataset`` (whose record is
    ``now``): ``2 added (a.png, b.png), 1 removed (c.png), 1 replaced (another file size: d.png)``, or
    the same images in another order; the digests that differ when the listing is not there."""
    from sgdm.data.files import item_sizes

    listing = _read_listing(run_dir / LISTING)
    if not isinstance(listing, dict) or listing.get("digests") != _digests(recorded) or "ids" not in listing:
        return ", ".join(f"{k} {str(now.get(k))[:12]} (recorded {str(recorded.get(k))[:12]})"
                         for k in COMPARED
                         if recorded.get(k) is not None and now.get(k) != recorded.get(k))
    return _change(listing["ids"], listing["sizes"], [str(i) for i in dataset.ids], item_sizes(dataset))


def _change(old_ids: Sequence[str], old_sizes: Optional[Sequence], ids: Sequence[str],
            sizes: Optional[Sequence]) -> str:
    """What differs from the images ``old_ids`` (with their file sizes ``old_sizes``; None: not known) to
    ``ids`` (``sizes``), in words (:func:`describe_change`)."""
    known, now_known = set(old_ids), set(ids)
    added = [i for i in ids if i not in known]
    removed = [i for i in old_ids if i not in now_known]
    replaced = []
    if sizes is not None and old_sizes is not None:  # a missing file counts: its size is None
        old = {i: list(s) for i, s in zip(old_ids, old_sizes)}
        replaced = [i for i, s in zip(ids, sizes) if i in old and old[i] != list(s)]
    parts = [f"{len(found)} {what} ({_names(found)})" for found, what in ((added, "added"), (removed, "removed"))
             if found]
    if replaced:
        parts.append(f"{len(replaced)} replaced (another file size: {_names(replaced)})")
    if not parts:
        first = next((k for k, (a, b) in enumerate(zip(ids, old_ids)) if a != b), None)
        return "the same images in another order" + ("" if first is None else f" (first at index {first}: "
                                                                                f"{ids[first]})")
    return ", ".join(parts)


def _names(ids: Sequence[str]) -> str:
    from sgdm.data.decode import printable

    return ", ".join(printable(i) for i in ids[:SHOWN]) + (", ..." if len(ids) > SHOWN else "")


def check_same_images(run_dir: pathlib.Path, now: dict, dataset, data_cfg) -> None:
    """Refuse to resume the run in ``run_dir`` on other images than its ``RECORD`` says it trained on:
    ``now`` is the record of ``dataset``, built from ``data_cfg``. A run without the record (started by an
    older sgdm) is not compared; one recorded without sizes, by its ids."""
    path = run_dir / RECORD
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())
    if not _differs(recorded, now):
        return
    where = f"{data_cfg.root}" + (f" (data.list_file {data_cfg.list_file})" if data_cfg.list_file is not None else "")
    raise ConfigError("data.root", f"{where} holds other images than this run started with ({path}): "
                                   f"{describe_change(run_dir, recorded, now, dataset)}; the run's data order, "
                                   f"latent cache and annotations are those of the recorded images, so resuming "
                                   f"would not continue the same run. Put those images back, or start a new "
                                   f"run.name")


def agree_across_ranks(dataset, root: Optional[pathlib.Path]) -> None:
    """Refuse to train when the processes of the joined process group (torch.distributed) see other images
    than rank 0: each compares its :func:`record` of ``dataset`` (read from ``root``, data.root) with rank 0's,
    and when one differs, every rank raises the same ConfigError naming the ranks and their first differing
    files. Without it, a rank that saw other files refused a resume alone while the others waited for it,
    or the ranks trained on different images. Costs one gather of the records' digests when they agree;
    rank 0's ids and sizes are sent only when one differs. A no-op outside a group of several."""
    import torch.distributed as dist

    from sgdm.data.files import item_sizes

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    views: list = [None] * world
    dist.all_gather_object(views, record(dataset, root))
    differ = [r for r, view in enumerate(views) if any(view.get(k) != views[0].get(k) for k in COMPARED)]
    if not differ:
        return
    ids = [str(i) for i in dataset.ids]
    first = [(ids, item_sizes(dataset)) if rank == 0 else None]
    dist.broadcast_object_list(first, src=0)
    changes: list = [None] * world
    dist.all_gather_object(changes, _change(*first[0], ids, item_sizes(dataset)) if rank in differ else None)

    def where(r: int) -> str:
        return f"rank {r}" + (f" ({views[r]['root']})" if views[r].get("root") != views[0].get("root") else "")

    found = "; ".join(f"{where(r)} against rank 0: {changes[r]}" for r in differ)
    raise ConfigError("data.root", f"the {world} processes of this run do not see the same images under "
                                   f"{views[0].get('root')}: {found}. Each would train on its own files (a copy "
                                   f"still being written, node-local copies that differ); make them the same on "
                                   f"every node, then start again")


def same_images_callback(dataset, root: Optional[pathlib.Path]):
    """A Lightning callback that runs :func:`agree_across_ranks` when the process group has formed: for
    processes that Lightning's own launcher starts (``train.devices`` > 1), which exist only from
    ``Trainer.fit`` on."""
    import pytorch_lightning as pl

    class SameImagesOnEveryRank(pl.Callback):
        def setup(self, trainer, pl_module, stage: str) -> None:
            agree_across_ranks(dataset, root)

    return SameImagesOnEveryRank()
