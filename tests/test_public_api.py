"""The public API as a researcher meets it after ``import sgdm`` in a notebook.

Every module imports; every name in every ``__all__`` exists and (function or class) says what
it does; the packages list their lazily imported names in ``dir()`` (tab completion); the
user-facing methods and properties have docstrings; ``import sgdm`` and the light subpackages
stay light and leave the process as they found it (no torch, no heavy optional modules, no
global RNG draw, no CUDA, no warnings, no environment change).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import sgdm

# every module whose dotted name has no part starting with "_" (sgdm._C, sgdm.ops._checks, ... are private)
MODULES = ["sgdm"] + sorted(m.name for m in pkgutil.walk_packages(sgdm.__path__, "sgdm.")
                            if not any(part.startswith("_") for part in m.name.split(".")))

# the packages a user reaches through (``sgdm.X.name``): each needs an __all__ that dir() shows
PACKAGES = ["sgdm", "sgdm.annotation", "sgdm.config", "sgdm.data", "sgdm.diffusion", "sgdm.evaluation",
            "sgdm.models", "sgdm.ops", "sgdm.quickstart", "sgdm.training"]

# modules without an __all__ when this test was written (command-line entry points, config sections,
# the data readers, two ops modules): new modules declare theirs; this list only shrinks
WITHOUT_ALL = {
    "sgdm.annotation.config", "sgdm.cli", "sgdm.cli.annotate", "sgdm.cli.arguments", "sgdm.cli.clusters",
    "sgdm.cli.evaluate", "sgdm.cli.info", "sgdm.cli.main", "sgdm.cli.pretrain_features", "sgdm.cli.sample",
    "sgdm.cli.train", "sgdm.cli.train_autoencoder", "sgdm.cli.validate_data", "sgdm.data.base", "sgdm.data.build",
    "sgdm.data.coco", "sgdm.data.collate", "sgdm.data.config", "sgdm.data.decode", "sgdm.data.folders",
    "sgdm.data.lsun", "sgdm.data.scan", "sgdm.data.shapes", "sgdm.data.transforms", "sgdm.data.voc",
    "sgdm.diffusion.config", "sgdm.evaluation.config", "sgdm.features_pretrain", "sgdm.features_pretrain.config",
    "sgdm.ops.group_norm_silu", "sgdm.ops.guided_ddim_step", "sgdm.ops.reference", "sgdm.quickstart.config",
    "sgdm.training.config",
}

# public methods and properties a notebook user calls: each says what it does
USER_METHODS = [
    ("sgdm.pipeline", "SelfGuidedPipeline", ["__call__", "from_pretrained", "from_config", "save_pretrained", "to",
                                              "compile", "device", "num_classes", "latent_shape", "image_size",
                                              "timesteps"]),
    ("sgdm.diffusion.schedule", "NoiseSchedule", ["from_betas", "at"]),
    ("sgdm.diffusion.guidance", "ClassifierFreeGuidance", ["__call__"]),
    ("sgdm.diffusion.guidance", "GuidedEps", ["mix"]),
    ("sgdm.models.autoencoder", "DiagonalGaussian", ["sample", "mode", "kl"]),
    ("sgdm.models.autoencoder", "AutoencoderKL", ["encode", "decode", "forward", "encode_latents", "decode_latents",
                                                  "has_scale_factor"]),
    ("sgdm.models.unet", "UNet", ["forward"]),
    ("sgdm.annotation.store", "AnnotationStore", ["open", "get", "ids", "granularity", "num_classes", "method",
                                                  "source"]),
]


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:  # an optional dependency of that module is missing here
        pytest.skip(f"{name}: {err}")


def _own_docstring(obj) -> str:
    """The object's own docstring; the ones dataclasses and NamedTuples make up (``Name(a, b)``) count as none."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    doc = (doc or "").strip()
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(") and (
            dataclasses.is_dataclass(obj) or issubclass(obj, tuple)):
        try:
            if doc == f"{obj.__name__}{inspect.signature(obj)}".replace(" -> None", ""):
                return ""
        except (TypeError, ValueError):
            pass
    return doc


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_and_its_all_names_exist(name):
    module = _import(name)
    assert (module.__doc__ or "").strip(), f"{name}: no module docstring"
    names = getattr(module, "__all__", None)
    if names is None:
        assert name in WITHOUT_ALL, f"{name}: no __all__ (declare the module's public names)"
        return
    assert len(set(names)) == len(names), f"{name}.__all__ repeats {sorted(n for n in names if names.count(n) > 1)}"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what the module lacks: {missing}"


@pytest.mark.parametrize("name", MODULES)
def test_public_functions_and_classes_have_docstrings(name):
    module = _import(name)
    undocumented = [n for n in getattr(module, "__all__", ())
                    if (inspect.isfunction(getattr(module, n)) or inspect.isclass(getattr(module, n)))
                    and not _own_docstring(getattr(module, n))]
    assert not undocumented, f"{name}: public names without a docstring: {undocumented}"


@pytest.mark.parametrize("name", PACKAGES)
def test_package_lists_its_public_names_in_dir(name):
    """Tab completion (IPython, Jupyter) lists ``dir(package)``; lazily imported names must be in it."""
    package = _import(name)
    assert hasattr(package, "__all__"), f"{name}: no __all__"
    hidden = sorted(set(package.__all__) - set(dir(package)))
    assert not hidden, f"dir({name}) lacks the public names {hidden} (tab completion does not offer them)"


@pytest.mark.parametrize("module_name, cls_name, members", USER_METHODS)
def test_user_facing_methods_have_docstrings(module_name, cls_name, members):
    cls = getattr(_import(module_name), cls_name)
    undocumented = []
    for member in members:
        attr = inspect.getattr_static(cls, member)
        func = attr if isinstance(attr, property) else getattr(attr, "__func__", attr)  # a property's doc: fget's or doc=
        if not (getattr(func, "__doc__", None) or "").strip():
            undocumented.append(member)
    assert not undocumented, f"{module_name}.{cls_name}: no docstring on {undocumented}"


def test_top_level_names():
    assert sgdm.__all__ == ["SelfGuidedPipeline", "__version__"]
    assert isinstance(sgdm.__version__, str)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sgdm.nope  # noqa: B018


def test_models_package_reexports_the_networks_lazily():
    import sgdm.models
    from sgdm.models import autoencoder, config, unet

    assert sgdm.models.UNet is unet.UNet
    assert sgdm.models.AutoencoderKL is autoencoder.AutoencoderKL
    for name in ("ModelConfig", "UNetConfig", "AutoencoderConfig", "GuidanceConfig"):
        assert getattr(sgdm.models, name) is getattr(config, name)
    with pytest.raises(AttributeError, match="sgdm.models"):
        sgdm.models.Nope  # noqa: B018


# One fresh interpreter: the state before and after each import, as JSON.
_PROBE = r"""
import json, os, sys, warnings
warnings.simplefilter("always")
before_env, before_modules = dict(os.environ), set(sys.modules)
with warnings.catch_warnings(record=True) as caught:
    import sgdm
first = {"new": sorted({m.split(".")[0] for m in set(sys.modules) - before_modules}),  # sgdm's own modules: "sgdm"
         "env": sorted(k for k in set(os.environ) | set(before_env) if os.environ.get(k) != before_env.get(k)),
         "warnings": [str(w.message) for w in caught]}
import torch
HEAVY = ("lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics", "torch_fidelity", "timm", "matplotlib",
         "transformers", "huggingface_hub", "requests")
rng, env, report = torch.random.get_rng_state(), dict(os.environ), {}
for name in MODULES:
    with warnings.catch_warnings(record=True) as caught:
        __import__(name)
    report[name] = {"heavy": sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY)),
                    "rng": not torch.equal(rng, torch.random.get_rng_state()),
                    "cuda": torch.cuda.is_initialized(),
                    # torch.compiler.assume_constant_result imported it: seconds, and TORCHINDUCTOR_CACHE_DIR set
                    "dynamo": "torch._dynamo" in sys.modules,
                    "env": sorted(k for k in set(os.environ) | set(env) if os.environ.get(k) != env.get(k)),
                    "warnings": [str(w.message) for w in caught]}
print(json.dumps({"first": first, "modules": report}))
"""

LIGHT = ["sgdm.config", "sgdm.diffusion", "sgdm.annotation", "sgdm.data", "sgdm.evaluation", "sgdm.training",
         "sgdm.quickstart", "sgdm.models", "sgdm.ops", "sgdm.diffusion.samplers", "sgdm.models.unet",
         "sgdm.models.autoencoder", "sgdm.pipeline", "sgdm.annotation.kmeans", "sgdm.annotation.store"]


@pytest.fixture(scope="module")
def import_probe():
    env = {k: v for k, v in os.environ.items() if k not in ("SGDM_KERNELS", "TORCHINDUCTOR_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", _PROBE.replace("MODULES", repr(LIGHT))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr == "", f"importing printed: {out.stderr[-2000:]}"
    return json.loads(out.stdout)


def test_import_sgdm_imports_nothing_and_changes_nothing(import_probe):
    first = import_probe["first"]
    assert first["new"] == ["sgdm"], f"import sgdm imported {first['new']}"
    assert first["env"] == [] and first["warnings"] == []


@pytest.mark.parametrize("name", LIGHT)
def test_light_imports_leave_heavy_modules_rng_cuda_and_environment_alone(import_probe, name):
    state = import_probe["modules"][name]
    assert state["heavy"] == [], f"import {name} imported {state['heavy']}"
    assert not state["rng"], f"import {name} drew from torch's global RNG"
    assert not state["cuda"], f"import {name} initialised CUDA"
    assert not state["dynamo"], f"import {name} imported torch._dynamo"
    assert state["env"] == [], f"import {name} changed the environment variables {state['env']}"
    assert state["warnings"] == [], f"import {name} warned: {state['warnings']}"
