"""``train.cache_latents``: encode the dataset once, then train from the cached posteriors.

Each image i is encoded unflipped and flipped; the cache keeps the posterior
parameters (mean, logvar) of both, so training still draws a fresh latent
sample each step (from the step's generator) and the flip decision stays the
trainer's. Layout of the cache directory::

    manifest.json          fingerprint, number of samples, shard size, ids, digest of ids and file sizes
    shard-XXXXX.safetensors mean, logvar, mean_flip, logvar_flip: [n, C, h, w] float32

Rows follow dataset indices, so the trainer's data order (:mod:`sgdm.training.data_order`) reads the
cache as it reads the images. An unreadable image (``data.on_bad_image: skip``) keeps its row, zero
and with id ``null``; the cache returns None for it, and the collate drops it from its micro-batch,
exactly as training from the images does.

Shards are written atomically and in order; an interrupted encode resumes at
the first missing shard. The fingerprint covers the data config (not where the images are:
``LOCATIONS``) and the first-stage weights, and the manifest's ids must be the dataset's (images added or removed under the
same settings) and their file sizes the same (an image replaced in place under its name: :mod:`sgdm.data.files`),
so a stale cache is rebuilt rather than silently reused: in the run's own directory
(``RUN/latents``); a ``train.cache_dir`` the config names may be shared by runs, so a stale cache
there is refused instead of deleted under a run that may be reading it.
One process at a time builds (the lock file ``.lock``): the ranks that torchrun starts together
wait for the first and then read its cache instead of each encoding the dataset into the same files.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Optional

import torch
from torch.utils.data import Dataset

from sgdm.config.core import ConfigError
from sgdm.data.config import recorded_data
from sgdm.atomic import atomic_open, atomic_write_text
from sgdm.training.checkpoint import clean_leftovers
from sgdm.training.file_lock import exclusive_lock

__all__ = ["cache_dir_for", "ensure_latent_cache", "LatentCacheDataset", "flip_latent_sample", "fingerprint"]


def cache_dir_for(cfg) -> pathlib.Path:
    """The latent cache's directory for experiment config ``cfg``: ``train.cache_dir``, else
    ``<run.path>/latents``."""
    return cfg.train.cache_dir if cfg.train.cache_dir is not None else cfg.run.path / "latents"


# data settings that do not change the cached encodings: loader processes, what an unreadable file does
# (under skip its row is marked unreadable, under raise nothing is cached), and flip (both orientations
# are cached; the trainer picks one)
NOT_IN_FINGERPRINT = ("num_workers", "on_bad_image", "flip")
# where the images are, not what they are: a dataset copied elsewhere (node-local scratch, a resume that
# accepted a moved data.root) keeps its cache; which images the rows hold is checked by their ids
LOCATIONS = ("root", "list_file", "shapes.cache_dir")


def fingerprint(data_cfg, first_stage: torch.nn.Module, locations: bool = False) -> str:
    """sha256 of the data settings that decide the pixels and of the first-stage weights (keys added
    since caches were first written count only away from their old value: ``recorded_data``). With
    ``locations``, also of :data:`LOCATIONS`, as caches written before they were left out."""
    data = {k: v for k, v in recorded_data(data_cfg).items() if k not in NOT_IN_FINGERPRINT}
    if not locations:
        for key in LOCATIONS:
            *parents, leaf = key.split(".")
            section = data
            for parent in parents:
                section = section.get(parent) if isinstance(section, dict) else None
            if isinstance(section, dict):
                section.pop(leaf, None)
    h = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode())
    for name, tensor in sorted(first_stage.state_dict().items()):
        if name == "scale_factor":  # set after caching; the encodings do not depend on it
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-dim buffers (scale_factor)
    return h.hexdigest()


def _shard_path(directory: pathlib.Path, index: int) -> pathlib.Path:
    return directory / f"shard-{index:05d}.safetensors"


_FIELDS = ("mean", "logvar", "mean_flip", "logvar_flip")


def _encode(first_stage, images: torch.Tensor, device) -> dict[str, torch.Tensor]:
    out = {}
    for suffix, x in (("", images), ("_flip", images.flip(-1))):
        posterior = first_stage.encode(x.to(device))
        out["mean" + suffix] = posterior.mean.float().cpu().contiguous()
        out["logvar" + suffix] = posterior.logvar.float().cpu().contiguous()
    return out


def _with_unreadable_rows(encoded: Optional[dict], readable: list[bool], latent_shape) -> dict[str, torch.Tensor]:
    """One row per index: the encodings of the readable images, zeros for the unreadable ones."""
    if all(readable):
        return encoded
    rows = {k: torch.zeros(len(readable), *latent_shape) for k in _FIELDS}
    if encoded is not None:
        mask = torch.tensor(readable)
        for k in _FIELDS:
            rows[k][mask] = encoded[k]
    return rows


def _write_shard(directory, index, dataset, lo, hi, first_stage, device, batch_size,
                 latent_shape) -> list[Optional[str]]:
    """Encode indices [lo, hi) into shard ``index``; their ids, None for an unreadable image."""
    from safetensors.torch import save

    parts, ids = [], []
    for start in range(lo, hi, batch_size):
        samples = [dataset[i] for i in range(start, min(hi, start + batch_size))]
        readable = [s["image"] for s in samples if s is not None]
        encoded = _encode(first_stage, torch.stack(readable), device) if readable else None
        parts.append(_with_unreadable_rows(encoded, [s is not None for s in samples], latent_shape))
        ids.extend(None if s is None else str(s["id"]) for s in samples)
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    with atomic_open(_shard_path(directory, index), "wb") as fh:
        fh.write(save(tensors))
    return ids


@torch.no_grad()
def ensure_latent_cache(cfg, first_stage, batch_size: int = 32, dataset=None) -> pathlib.Path:
    """Build (or finish) the cache for ``cfg`` and return its directory. ``dataset``: the training images,
    when built already (else built here).

    Under the directory's lock: a process that finds another one building waits for it, then finds
    the cache complete (or finishes what an interrupted build left)."""
    directory = cache_dir_for(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory / ".lock", f"the latent cache {directory}"):
        clean_leftovers(directory)  # shards of an interrupted write; no one else writes while we hold the lock
        _build(cfg, first_stage, directory, batch_size, dataset)
    return directory


def _build(cfg, first_stage, directory: pathlib.Path, batch_size: int, dataset=None) -> None:
    from sgdm.training.data import build_image_dataset

    dataset = dataset if dataset is not None else build_image_dataset(cfg.data, cfg.run.seed)
    files = _files_digest(dataset)
    first_stage = first_stage.eval()
    device = next(first_stage.parameters()).device
    side = cfg.data.size // first_stage.cfg.downsample_factor
    latent_shape = (first_stage.cfg.embed_dim, side, side)
    fp = fingerprint(cfg.data, first_stage)
    manifest_path = directory / "manifest.json"
    shard = cfg.train.cache_shard_size
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("fingerprint") not in (None, fp) and manifest["fingerprint"] == fingerprint(
            cfg.data, first_stage, locations=True):
        manifest["fingerprint"] = fp  # written before LOCATIONS were left out: the same settings
        atomic_write_text(manifest_path, json.dumps(manifest))
    if manifest and "files_sha256" not in manifest and _same_images(manifest, dataset):
        manifest["files_sha256"] = files  # written before sizes were recorded: nothing to compare them with
        atomic_write_text(manifest_path, json.dumps(manifest))
    stale = manifest.get("fingerprint") != fp or manifest.get("shard_size") != shard
    if stale or not _same_images(manifest, dataset) or manifest.get("files_sha256") != files:
        if manifest and cfg.train.cache_dir is not None:
            # a directory the config names may be shared: another run may be reading these shards
            raise ConfigError("train.cache_dir", f"{directory} holds the latents of other data settings or another "
                                                 f"first stage (or of other images, or of images since replaced in "
                                                 f"place, or train.cache_shard_size "
                                                 f"{manifest.get('shard_size')}), perhaps in use by another run; "
                                                 f"give this run its own directory, or delete that one to rebuild it")
        for old in directory.glob("shard-*.safetensors"):
            old.unlink()
        manifest = {"fingerprint": fp, "num_samples": len(dataset), "shard_size": shard, "ids": [], "complete": False,
                    "files_sha256": files}
    if manifest["complete"]:  # (the loop below would rewrite a partial last shard)
        return
    num_shards = (len(dataset) + shard - 1) // shard
    for index in range(len(manifest["ids"]) // shard, num_shards):
        lo, hi = index * shard, min(len(dataset), (index + 1) * shard)
        manifest["ids"].extend(_write_shard(directory, index, dataset, lo, hi, first_stage, device, batch_size,
                                                 latent_shape))
        manifest["complete"] = index == num_shards - 1
        atomic_write_text(manifest_path, json.dumps(manifest))


def _files_digest(dataset) -> Optional[str]:
    """Digest of ``dataset``'s ids and file sizes; None for a dataset without files per item."""
    from sgdm.data.files import files_hash, item_sizes

    sizes = item_sizes(dataset)
    return None if sizes is None else files_hash(dataset.ids, sizes)


def _same_images(manifest: dict, dataset) -> bool:
    """Whether the cache's rows are still the dataset's images: the same number, and the ids cached so far
    (of the readable ones) at the same indices. The fingerprint covers the data settings, not the files: a
    folder with images added or removed under the same settings must not be read through the old rows."""
    if manifest.get("num_samples") != len(dataset):
        return False
    ids = getattr(dataset, "ids", None)
    if ids is None:
        return True
    return all(cached is None or cached == str(ids[i]) for i, cached in enumerate(manifest.get("ids", [])))


class LatentCacheDataset(Dataset):
    """Samples ``{"mean", "logvar", "mean_flip", "logvar_flip", "id"}`` from a complete cache; None for
    an image that was unreadable when it was cached (``data.on_bad_image: skip``)."""

    def __init__(self, directory: pathlib.Path):
        self.directory = pathlib.Path(directory)
        path = self.directory / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"latent cache {self.directory} has no manifest.json; it is built when training "
                                    f"starts with train.cache_latents: true")
        self.manifest = json.loads(path.read_text())
        if not self.manifest.get("complete"):
            raise RuntimeError(f"latent cache {self.directory} is incomplete; restart training to finish it")
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def _handle(self, shard: int):
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(str(_shard_path(self.directory, shard)), framework="pt")
        return self._handles[shard]

    def __getitem__(self, index: int) -> Optional[dict]:
        if not 0 <= index < len(self):
            raise IndexError(f"latent cache index {index} out of range [0, {len(self)})")
        if self.manifest["ids"][index] is None:
            return None
        shard, row = divmod(index, int(self.manifest["shard_size"]))
        handle = self._handle(shard)
        out = {k: handle.get_slice(k)[row:row + 1][0] for k in _FIELDS}
        out["id"] = self.manifest["ids"][index]
        return out

    def __getstate__(self):  # DataLoader workers reopen their own handles
        return {**self.__dict__, "_handles": {}}


def flip_latent_sample(sample: dict) -> dict:
    """The cached posterior of the flipped image (encoded flipped, not a flipped latent)."""
    return {**sample, "mean": sample["mean_flip"], "logvar": sample["logvar_flip"]}
