"""LSUN's official LMDB release (``church_outdoor_train_lmdb/``): key = image id, value = WebP or JPEG bytes.

The key list is read once when the dataset is built. Each process holds one
read-only, lock-free environment per LMDB, shared by every dataset object on
that path; a forked DataLoader worker replaces the one it inherited (LMDB
environments must not cross a fork), so any number of workers can read.
A ``data.mdb`` shorter than its header says (an interrupted copy) is refused when the dataset is
built: reading past its end would kill the process with a bus error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from sgdm.config.core import ConfigError
from sgdm.data.base import ImageDataset, RawSample, limit
from sgdm.data.decode import BadImageError
from sgdm.data.folders import require_dir


def _open(root: Path):
    import lmdb

    return lmdb.open(str(root), readonly=True, lock=False, readahead=False, meminit=False, max_readers=256)


_ENVS: dict[str, tuple[int, object]] = {}  # path -> (pid, environment): py-lmdb allows one per path per process


def _environment(root: Path):
    """This process's environment for ``root``; one inherited through a fork is closed and replaced."""
    key = str(root.resolve())
    pid, env = _ENVS.get(key, (None, None))
    if pid != os.getpid():
        if env is not None:
            env.close()  # the child's copy only (read-only, lock=False: no shared reader table)
        env = _open(root)
        _ENVS[key] = (os.getpid(), env)
    return env


def _lmdb_below(root: Path) -> str:
    """``': ROOT holds ROOT/x_lmdb (or one of N more)'`` naming the LMDB directories right below ``root``
    (the folder above them is a common mistake: LSUN's download unpacks every category's *_lmdb side by
    side), or ''."""
    try:
        found = sorted(p for p in root.iterdir() if (p / "data.mdb").is_file())
    except OSError:
        return ""
    if not found:
        return ""
    more = f" (or one of {len(found) - 1} more)" if len(found) > 1 else ""
    return f": {root} holds {found[0]}{more}"


def _require_whole(env, root: Path, key: str) -> None:
    """Refuse a ``data.mdb`` shorter than the pages its header says it holds (an interrupted download or
    copy): LMDB maps the file into memory, and reading a page past its end kills the process with a bus
    error (SIGBUS), no Python exception, no message."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = (root / "data.mdb").stat().st_size
    if size < needed:
        raise ConfigError(key, f"{root / 'data.mdb'} is truncated: {size} bytes, but its LMDB header counts "
                               f"{needed} (an interrupted download or copy); copy or download it again")


class LsunLmdbDataset(ImageDataset):
    name = "lsun_lmdb"

    def __init__(self, root: Path, max_images: Optional[int] = None, key: str = "data", **kwargs):
        root = Path(root)
        if root.is_file() and root.name in ("data.mdb", "lock.mdb"):
            raise ConfigError(f"{key}.root", f"{root} is the LMDB's {root.name} file; point root at the directory "
                                             f"holding it: {root.parent}")
        root = require_dir(root, f"{key}.root", "LSUN LMDB directory")
        if not (root / "data.mdb").is_file():
            raise ConfigError(f"{key}.root", f"{root} has no data.mdb; point root at the *_lmdb directory"
                                             f"{_lmdb_below(root)}")
        import lmdb

        try:
            env = _environment(root)
        except lmdb.Error as err:
            raise ConfigError(f"{key}.root", f"cannot open LMDB {root}: {err}") from None
        _require_whole(env, root, f"{key}.root")
        try:
            with env.begin() as txn:
                keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
        except lmdb.Error as err:  # a damaged page on the way to the keys
            raise ConfigError(f"{key}.root", f"cannot list the keys of LMDB {root} ({type(err).__name__}: {err}); "
                                             "its data.mdb is damaged: copy or download it again") from None
        if not keys:
            raise ConfigError(f"{key}.root", f"LMDB {root} holds no images")
        keys = limit(keys, max_images)
        super().__init__([k.decode("utf-8", "replace") for k in keys], **kwargs)
        self.root = root
        self.keys = keys

    def source(self, index: int) -> str:
        return f"{self.root}[{self.ids[index]}]"

    def load(self, index: int) -> RawSample:
        import lmdb

        try:
            with _environment(self.root).begin(buffers=False) as txn:
                data = txn.get(self.keys[index])
        except lmdb.Error as err:  # a damaged page of the LMDB: this value cannot be read
            raise BadImageError(self.source(index), f"cannot read the LMDB value ({type(err).__name__}: {err})") \
                from None
        if not data:
            raise BadImageError(self.source(index), "key not found in the LMDB" if data is None else "zero-byte value")
        return self.read(self.source(index), data)
