"""What this installation of sgdm is and can do, for ``sgdm-ldm info`` and bug reports.

:func:`collect` gathers, without a network and in about a second: versions, whether the compiled
extension ``sgdm._C`` loaded (and why not), the CPU ISAs its kernels were built for and which this
CPU runs, whether CUDA kernels (and the Hopper wgmma attention kernels) are in the build, the
visible GPUs, which implementation each op runs per device (:func:`sgdm.ops.backend`), the
environment variables sgdm reads, and which pretrained files an offline machine already holds.
:func:`format_report` prints it for people; the dict itself is JSON.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import pathlib
import platform
import socket
import sys
from typing import Any

import torch

__all__ = ["collect", "format_report", "env_flag", "hub_offline", "offline", "download_timeout", "ENV_VARS",
           "DISTRIBUTIONS"]

_TRUE = ("1", "ON", "YES", "TRUE")  # huggingface_hub's spellings of a true environment flag


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set true, as huggingface_hub reads its flags
    (1 / on / yes / true in any case; anything else, unset included, is false)."""
    return os.environ.get(name, "").strip().upper() in _TRUE


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE``: timm and torch-fidelity weights come from local caches only."""
    return env_flag("HF_HUB_OFFLINE")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` or ``SGDM_OFFLINE``: a torch hub download sgdm starts (Inception, VGG16) is
    refused at once when the file is not cached, instead of waiting on a network that is not there."""
    return hub_offline() or env_flag("SGDM_OFFLINE")


@contextlib.contextmanager
def download_timeout(seconds: float = 60.0):
    """Bounds each socket operation of a download inside the block (torch.hub's urlopen has no
    timeout of its own): a network that drops packets is an error after ``seconds``, not a hang."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)

# The environment variables sgdm (or what it loads offline) reads, and what each does.
ENV_VARS = {
    "SGDM_KERNELS": "0 runs every op's plain-PyTorch reference",
    "SGDM_ATTENTION_WGMMA": "0 runs the mma.sync attention kernels on a compute capability 9.0 GPU too (the "
                            "default there is the Hopper wgmma kernels, with a 9.0a build); 1 requires the wgmma ones",
    "SGDM_REQUIRE_KERNELS": "1 makes the tests fail, not skip, without the compiled kernels",
    "SGDM_OFFLINE": "1: the Inception (FID/IS/KID) and VGG16 (vgg16_download) weights only from the torch "
                    "hub cache, as HF_HUB_OFFLINE=1 does; it stops no other download",
    "HF_HUB_OFFLINE": "1: timm and torch-fidelity weights only from local caches",
    "SGDM_CACHE": "where the shapes dataset is generated when data.shapes.cache_dir is unset (default ~/.cache/sgdm)",
    "ATEN_CPU_CAPABILITY": "default or avx2 caps the instruction set of the CPU kernels (read by PyTorch)",
    "TORCH_HOME": "the torch hub cache (Inception, VGG16 weights)",
    "CUDA_VISIBLE_DEVICES": "the GPUs this process sees",
    "OMP_NUM_THREADS": "CPU threads of the kernels and of PyTorch",
}

# Distributions whose versions a bug report needs (the pip names).
DISTRIBUTIONS = ("torch", "torchvision", "pytorch-lightning", "timm", "kornia", "torch-fidelity",
                 "taming-transformers-rom1504", "safetensors", "numpy", "pillow", "scipy", "lmdb", "tensorboard")

_ISAS = ("default", "avx2", "avx512")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _extension() -> dict[str, Any]:
    from sgdm.ops import _extension

    loaded = _extension.load()
    return {"requested": _extension.requested(), "loaded": loaded, "error": _extension.load_error(),
            "path": getattr(sys.modules.get("sgdm._C"), "__file__", None) if loaded else None}


def _cpu_isas(loaded: bool) -> dict[str, Any]:
    """The ISA the CPU kernels run with, and for each ISA whether it can run here (or why not)."""
    from sgdm.ops import _extension

    if not loaded:
        return {"active": None, "isas": {}}
    isas = {}
    for name in _ISAS:
        try:
            with _extension.force_cpu_isa(name):
                pass
            isas[name] = "runs"
        except RuntimeError as err:
            message = str(err).splitlines()[0]
            capped = os.environ.get("ATEN_CPU_CAPABILITY", "").strip()
            refused = (f"not allowed by ATEN_CPU_CAPABILITY={capped} (or not supported by this CPU)" if capped
                       else "not supported by this CPU")
            isas[name] = "not built" if "not compiled" in message else refused if "not supported" in message \
                else message
    return {"active": _extension.cpu_isa(), "isas": isas}


def _gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                     "memory_gib": round(p.total_memory / 2**30, 1)})
    return gpus


def _offline_files() -> dict[str, str | None]:
    """Pretrained files sgdm would otherwise download, and where this machine holds each (None: not here)."""
    from sgdm.evaluation.fidelity import INCEPTION_FILE
    from sgdm.models.autoencoder_losses import default_lpips_heads

    checkpoints = pathlib.Path(torch.hub.get_dir()) / "checkpoints"

    def cached(name: str) -> str | None:
        return str(checkpoints / name) if (checkpoints / name).is_file() else None

    try:
        from torchvision.models import VGG16_Weights

        vgg = cached(os.path.basename(VGG16_Weights.IMAGENET1K_V1.url))
    except ImportError:
        vgg = None
    try:
        from sgdm.annotation.features import cached_pretrained_file

        dino = cached_pretrained_file("vit_base_patch16_224.dino")
    except Exception:  # timm or huggingface_hub missing or too old: nothing cached that sgdm can use
        dino = None
    lpips = default_lpips_heads()
    return {"fid_inception (eval: fid, is, kid)": cached(INCEPTION_FILE),
            "vgg16 (train-autoencoder: LPIPS)": vgg,
            "lpips_heads (train-autoencoder: LPIPS)": None if lpips is None else str(lpips),
            "dino_vitb16 via timm (annotate without annotation.weights)": dino}


def collect() -> dict[str, Any]:
    """Everything :mod:`sgdm.environment` describes, as a JSON-ready dict (no network, no GPU work)."""
    from sgdm import __version__, ops
    from sgdm.ops.attention import wgmma_built

    extension = _extension()
    loaded = extension["loaded"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "sgdm": __version__,
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "torch_cuda": torch.version.cuda,
        "versions": {dist: torch.__version__ if dist == "torch" else _version(dist) for dist in DISTRIBUTIONS},
        "extension": extension,
        "cpu": _cpu_isas(loaded),
        "cuda_kernels": loaded and ops._extension.has_cuda_kernels(),
        "wgmma_kernels": loaded and wgmma_built(),
        "gpus": _gpus(),
        "backends": {device: ops.backend(device) for device in devices},
        "env": {name: os.environ.get(name) for name in ENV_VARS},
        "offline_files": _offline_files(),
    }


def _wgmma_state(built: bool, env: dict[str, str | None]) -> str:
    if not built:
        return "not built (no 9.0a)"
    if env.get("SGDM_ATTENTION_WGMMA") == "0":
        return "built, off (SGDM_ATTENTION_WGMMA=0)"
    return "built (fp16 / bf16 on compute 9.0 GPUs; SGDM_ATTENTION_WGMMA=0 runs mma.sync there)"


def format_report(info: dict[str, Any]) -> str:
    """``info`` (from :func:`collect`) as the text ``sgdm-ldm info`` prints."""
    ext = info["extension"]
    if not ext["requested"]:
        extension = "disabled by SGDM_KERNELS=0: every op runs its PyTorch reference"
    elif ext["loaded"]:
        extension = f"loaded ({ext['path']})"
    else:
        extension = f"not loaded: {ext['error']}; every op runs its PyTorch reference"
    lines = [f"sgdm {info['sgdm']}, Python {info['python']}, {info['platform']}, torch {info['versions']['torch']}"
             f" (CUDA {info['torch_cuda'] or 'none'})",
             f"extension      {extension}"]
    if ext["loaded"]:
        isas = ", ".join(f"{name}: {state}" for name, state in info["cpu"]["isas"].items())
        lines.append(f"CPU kernels    {info['cpu']['active']} ({isas})")
        cuda = "built" if info["cuda_kernels"] else "not built (a CPU-only build: FORCE_CUDA=1 or nvcc at build time)"
        if info["cuda_kernels"]:
            cuda += ", Hopper wgmma attention " + _wgmma_state(info["wgmma_kernels"], info["env"])
        lines.append(f"CUDA kernels   {cuda}")
    gpus = "; ".join(f"{g['index']}: {g['name']} (compute {g['capability']}, {g['memory_gib']} GiB)"
                     for g in info["gpus"]) or "none visible"
    lines.append(f"GPUs           {gpus}")
    for device, backends in info["backends"].items():
        lines.append(f"ops on {device:<7} " + ", ".join(f"{op}: {b}" for op, b in backends.items()))
    lines.append("packages       " + ", ".join(f"{d} {v or 'MISSING'}" for d, v in info["versions"].items()))
    set_vars = {k: v for k, v in info["env"].items() if v is not None}
    lines.append("environment    " + (", ".join(f"{k}={v}" for k, v in set_vars.items()) or "none of "
                                      + ", ".join(ENV_VARS) + " set"))
    lines.append("offline files  (pretrained weights sgdm would otherwise download; paths in configs and "
                 "flags need none of these)")
    for what, path in info["offline_files"].items():
        lines.append(f"  {what}: {path or 'not cached'}")
    return "\n".join(lines)
