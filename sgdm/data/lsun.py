"""LSUN's official LMDB release (``church_outdoor_train_lmdb/``): key = image id, value = WebP or JPEG bytes.

The key list is read once when the dataset is built. The LMDB environment is
opened lazily in each process (an open environment must not cross a fork), read
only and without locking, so any number of DataLoader workers can share it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from sgdm.config.core import ConfigError
from sgdm.data.base import ImageDataset, RawSample, limit
from sgdm.data.decode import BadImageError, decode_bytes
from sgdm.data.folders import require_dir


def _open(root: Path):
    import lmdb

    return lmdb.open(str(root), readonly=True, lock=False, readahead=False, meminit=False, max_readers=256)


class LsunLmdbDataset(ImageDataset):
    name = "lsun_lmdb"

    def __init__(self, root: Path, max_images: Optional[int] = None, key: str = "data", **kwargs):
        root = require_dir(Path(root), f"{key}.root", "LSUN LMDB directory")
        if not (root / "data.mdb").is_file():
            raise ConfigError(f"{key}.root", f"{root} has no data.mdb; point root at the *_lmdb directory")
        import lmdb

        try:
            env = _open(root)
        except lmdb.Error as err:
            raise ConfigError(f"{key}.root", f"cannot open LMDB {root}: {err}") from None
        with env.begin() as txn:
            keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
        env.close()
        if not keys:
            raise ConfigError(f"{key}.root", f"LMDB {root} holds no images")
        keys = limit(keys, max_images)
        super().__init__([k.decode("utf-8", "replace") for k in keys], **kwargs)
        self.root = root
        self.keys = keys
        self._env = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_env"] = None  # each worker opens its own environment
        return state

    def source(self, index: int) -> str:
        return f"{self.root}[{self.ids[index]}]"

    def load(self, index: int) -> RawSample:
        if self._env is None:
            self._env = _open(self.root)
        with self._env.begin(buffers=False) as txn:
            data = txn.get(self.keys[index])
        if not data:
            raise BadImageError(self.source(index), "key not found in the LMDB" if data is None else "zero-byte value")
        return RawSample(decode_bytes(data, self.source(index)))
