"""What a dataset's files are now, without reading them: each item's file sizes, one ``stat`` per file.

A run records them with the ids when it starts, and a resume and the latent cache compare them
(:mod:`sgdm.training.dataset_record`, :mod:`sgdm.training.latent_cache`): the ids alone miss an image
replaced in place under its name. Sizes, not modification times: a dataset copied anew for each job
(``cp -r`` to node-local scratch) gets new times but keeps its sizes, and a different picture stored
in a compressed format (JPEG, PNG, WebP) has the same byte length only by coincidence. Hashing the
bytes would be exact but reads every image (hours for ImageNet); a stat reads none.
"""
from __future__ import annotations

import hashlib
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

__all__ = ["Sizes", "item_sizes", "files_hash"]

Sizes = tuple  # one item's file sizes in bytes, in the order of ImageDataset.item_files; None: no such file

_CHUNK = 2048  # items per task: one task per item would cost more than its stats
# os.stat waits on the file system without the GIL: on a network file system (NFS, Lustre) a stat is
# a round trip, and many in flight hide the latency
_THREADS = 16
_taken: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # dataset -> its sizes, once per start


def _size(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_size
    except OSError:  # missing or unreachable: read as a bad file when trained on (data.on_bad_image)
        return None


def item_sizes(dataset) -> Optional[list[Sizes]]:
    """The sizes of the files each item of ``dataset`` is read from (``item_files``), in index order; None
    for a dataset without files of its own per item (shapes, an LMDB). Taken once per dataset object: the
    run's record and the latent cache of one start compare the same snapshot."""
    item_files = getattr(dataset, "item_files", None)
    if item_files is None or len(dataset) == 0 or not item_files(0):
        return None
    try:
        return _taken[dataset]
    except (KeyError, TypeError):  # TypeError: not weakly referable
        pass
    n = len(dataset)

    def chunk(lo: int) -> list[Sizes]:
        return [tuple(_size(path) for path in item_files(i)) for i in range(lo, min(n, lo + _CHUNK))]

    with ThreadPoolExecutor(min(_THREADS, (n + _CHUNK - 1) // _CHUNK)) as pool:
        sizes = [s for part in pool.map(chunk, range(0, n, _CHUNK)) for s in part]
    try:
        _taken[dataset] = sizes
    except TypeError:
        pass
    return sizes


def files_hash(ids: Sequence[str], sizes: Sequence[Sizes]) -> str:
    """sha256 of the ids in order with their file sizes (UTF-8, surrogate escapes as their bytes, as
    :func:`sgdm.annotation.store.ids_hash`)."""
    digest = hashlib.sha256()
    for image_id, item in zip(ids, sizes, strict=True):
        digest.update(str(image_id).encode("utf-8", "surrogateescape"))
        digest.update(("\t" + ",".join("-" if s is None else str(s) for s in item) + "\n").encode())
    return digest.hexdigest()
