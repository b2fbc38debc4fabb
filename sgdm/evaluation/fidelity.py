"""FID, Inception Score and KID through torch-fidelity's Inception-v3.

Images go in as uint8 [N, 3, H, W] (what torch-fidelity's extractor expects);
the reference set's Inception features are cached under ``cache_dir`` with a
name that includes the reference key and the weights' digest, so a second
evaluation against the same dataset does not re-extract them, and random test
weights never collide with real ones.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["UInt8Images", "inception_metrics", "check_inception_weights", "fetch_inception_weights", "weights_digest",
           "INCEPTION_FILE"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def _hub_file() -> pathlib.Path:
    """Where torch-fidelity's download of the Inception weights lies (torch hub's checkpoints folder)."""
    return pathlib.Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


class UInt8Images(Dataset):
    """A uint8 [N, 3, H, W] tensor as the Dataset torch-fidelity iterates."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def weights_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of the file's SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def check_inception_weights(path: str | os.PathLike | None) -> str:
    """Return a cache tag for the weights, or fail at once when none can be had.

    ``path`` given: it must exist. ``None``: torch-fidelity downloads into the
    torch hub cache; when that file is absent and ``HF_HUB_OFFLINE`` /
    ``SGDM_OFFLINE`` is set, say so now instead of failing after sampling.
    """
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights: file {path} does not exist")
        return weights_digest(path)
    cached = _hub_file()
    if cached.is_file():
        return "tf-inception-2015-12-05"
    from sgdm.environment import offline

    if offline():
        raise RuntimeError(
            "FID/IS/KID need Inception weights: offline mode is set and torch-fidelity's download "
            f"({INCEPTION_FILE}) is not in {cached.parent}; copy it there, or pass --inception-weights PATH "
            "(eval.inception_weights): that file, or pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the "
            "same FID Inception, same parameter names); or drop fid/is/kid from the metrics"
        )
    return "tf-inception-2015-12-05"


def fetch_inception_weights(timeout: float = 60.0) -> None:
    """Download torch-fidelity's Inception weights into the torch hub cache now, when they are not
    there yet, so that a machine without a network fails before sampling, not after it. ``timeout``
    (seconds) bounds each socket operation of the download: a network that drops packets is an
    error, not a hang."""
    if _hub_file().is_file():
        return
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from sgdm.environment import download_timeout

    try:
        with download_timeout(timeout):
            FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    except OSError as err:  # urllib errors, socket timeouts, a cache folder that cannot be written
        raise RuntimeError(
            f"FID/IS/KID need Inception weights: downloading torch-fidelity's {INCEPTION_FILE} into "
            f"{_hub_file().parent} failed ({err}); pass --inception-weights PATH (eval.inception_weights): that "
            "file, or pytorch-fid's pt_inception-2015-12-05-6726825d.pth; or drop fid/is/kid from the metrics"
        ) from None


def check_inception_weights_load(path: str | os.PathLike) -> None:
    """Build torch-fidelity's Inception from the file as its metrics will, so that a file that is
    not its state dict fails now, not after hours of sampling."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except Exception as err:  # unpickling errors, a wrong state dict (missing keys, shapes)
        message = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"--inception-weights: {path} is not torch-fidelity's inception-v3-compat state dict "
                         f"({type(err).__name__}: {message[:300]})") from None


def inception_metrics(
    generated: torch.Tensor,
    reference: Dataset,
    reference_key: str,
    metrics: Sequence[str] = ("fid", "is", "kid"),
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """FID / IS / KID of ``generated`` (uint8 [N,3,H,W]) against ``reference``.

    ``reference`` yields uint8 [3, H, W] tensors. Returns keys ``fid``,
    ``is_mean``, ``is_std``, ``kid_mean``, ``kid_std`` for the metrics asked.
    ``device``: where the Inception runs (``eval.device``; None: the current CUDA device when there is one).
    ``num_workers`` (``data.num_workers``): above 0, torch-fidelity reads both sets with DataLoader workers
    (its own count: min(4, 2 x CPUs); ``reference`` must then be picklable or forkable, with no scan left
    to do in a worker); 0: in this process.
    """
    import torch_fidelity

    unknown = set(metrics) - {"fid", "is", "kid"}
    if unknown:
        raise ValueError(f"metrics: unknown {sorted(unknown)}; torch-fidelity computes fid, is, kid")
    tag = check_inception_weights(weights_path)
    gen = UInt8Images(generated)
    device = torch.device(device) if device is not None else None
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    subset = min(kid_subset_size, len(gen), len(reference))
    kwargs = dict(
        input1=gen,
        input2=reference,
        cuda=cuda,
        batch_size=batch_size,
        isc="is" in metrics,
        fid="fid" in metrics,
        kid="kid" in metrics,
        kid_subsets=kid_subsets,
        kid_subset_size=subset,
        isc_splits=min(10, len(gen)),
        feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        input2_cache_name=f"sgdm-{reference_key}-{tag}",
        cache_root=None if cache_dir is None else str(cache_dir),
        verbose=False,
        # torch-fidelity's only switch for its DataLoader workers: a reference set read from files (126,689
        # ImageNet-100 JPEGs) is decoded in parallel; without workers (0) everything is read in this process
        save_cpu_ram=num_workers == 0,
    )
    try:
        if cuda and device is not None and device.index is not None:
            with torch.cuda.device(device):  # torch-fidelity moves its Inception to the current CUDA device
                raw = torch_fidelity.calculate_metrics(**kwargs)
        else:
            raw = torch_fidelity.calculate_metrics(**kwargs)
    except OSError as err:  # urllib errors subclass OSError, and so do those of the cache folder
        if weights_path is None and not _hub_file().is_file():
            raise RuntimeError(
                f"could not get torch-fidelity's Inception weights ({err}); pass --inception-weights PATH"
            ) from err
        cache = kwargs["cache_root"] or "$TORCH_HOME/fidelity_cache"  # torch-fidelity's default
        raise RuntimeError(f"FID/IS/KID: {err}; torch-fidelity keeps the reference set's Inception features in "
                           f"{cache} (eval.cache_dir), which must be a writable folder") from err
    names = {
        "frechet_inception_distance": "fid",
        "inception_score_mean": "is_mean",
        "inception_score_std": "is_std",
        "kernel_inception_distance_mean": "kid_mean",
        "kernel_inception_distance_std": "kid_std",
    }
    return {names[k]: float(v) for k, v in raw.items() if k in names}
