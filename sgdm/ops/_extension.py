"""Loading of the compiled extension ``sgdm._C`` and backend selection.

The extension is imported at most once. ``SGDM_KERNELS=0`` disables it, and
every op then runs its plain-PyTorch reference. An op uses its kernel on a
device only when the extension registered one for that device
(``kernels_enabled(op, device_type)``), so a CPU-only build still works on
CUDA tensors (through the reference), and on CUDA only when every visible GPU
has compute capability 8.0 or newer (a V100 or T4 runs the references).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator

import torch

_DISABLE_VALUES = {"0", "false", "no", "off"}


def requested() -> bool:
    """False when the user disabled kernels with ``SGDM_KERNELS=0``."""
    return os.environ.get("SGDM_KERNELS", "1").strip().lower() not in _DISABLE_VALUES


_loaded: bool | None = None
_error: str | None = None  # why the import failed, for load_error()


def load() -> bool:
    """Imports ``sgdm._C`` once; True when its ops are registered."""
    global _loaded
    if _loaded is None:
        _loaded = requested() and _import()
    return _loaded


def load_error() -> str | None:
    """Why :func:`load` found no extension (not built, or the import's error), None when it loaded or
    was not asked to (``SGDM_KERNELS=0``)."""
    load()
    return _error


def _import() -> bool:
    global _error
    try:
        importlib.import_module("sgdm._C")
    except ImportError as exc:
        # A missing build is normal (pure-Python install); a broken one is worth a word.
        if "No module named" in str(exc):
            _error = "not built (pip install -e . builds it)"
        else:
            _error = str(exc)
            warnings.warn(f"sgdm: compiled extension failed to load ({exc}); using references",
                          RuntimeWarning, stacklevel=3)
        return False
    return True


def has_op(name: str) -> bool:
    """True when ``torch.ops.sgdm.<name>`` exists (extension loaded and op compiled)."""
    return load() and torch._C._dispatch_has_kernel(f"sgdm::{name}")


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


_enabled: dict[tuple[str, str], bool] = {}  # registrations never change once loaded


def constant_for_compile(fn):
    """``torch.compiler.assume_constant_result`` (dynamo calls ``fn`` while tracing instead of tracing
    into it, and takes its result as a constant) without importing ``torch._dynamo`` when ``sgdm.ops`` is
    imported: that import takes seconds and sets ``TORCHINDUCTOR_CACHE_DIR``, and the decorator's whole
    effect is this mark, read when dynamo traces a call (tests/ops compile with ``fullgraph=True``)."""
    fn._dynamo_marked_constant = True
    return fn


def _registered(op: str, device_type: str) -> bool:
    """True when the extension registered a kernel of op ``op`` for ``device_type``."""
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and has_op(op) and \
        torch._C._dispatch_has_kernel_for_dispatch_key(f"sgdm::{op}", key)


# The CUDA kernels use sm_80 instructions (cp.async, bf16 mma.sync); setup.py builds them for
# compute capability 8.0 and newer only, so a V100 (7.0) or T4 (7.5) has no code to run.
MIN_CUDA_CAPABILITY = (8, 0)
_cuda_ok: bool | None = None


def _build_runs_on(index: int) -> bool:
    """Whether this build holds code GPU ``index`` can load (its TORCH_CUDA_ARCH_LIST covers the
    device), asked of the build itself; True for a build too old to answer."""
    return not has_op("_cuda_kernels_run_on") or bool(torch.ops.sgdm._cuda_kernels_run_on(index))


def _cuda_device_problem(index: int, probed: dict[tuple[int, int], bool]) -> str | None:
    """Why GPU ``index`` cannot run the kernels, None when it can. The build's answer depends on the
    compute capability alone, so ``probed`` keeps it per capability: the probe makes a CUDA context
    on the device it asks about, which costs hundreds of MiB on each GPU a process never uses."""
    major, minor = torch.cuda.get_device_capability(index)
    name = f"cuda:{index} ({torch.cuda.get_device_name(index)}, compute capability {major}.{minor})"
    if (major, minor) < MIN_CUDA_CAPABILITY:
        return f"{name}: the kernels need compute capability %d.%d or newer" % MIN_CUDA_CAPABILITY
    if (major, minor) not in probed:
        probed[(major, minor)] = _build_runs_on(index)
    if not probed[(major, minor)]:
        return f"{name}: this build of sgdm has no code for it (rebuild with it in TORCH_CUDA_ARCH_LIST)"
    return None


def cuda_devices_supported() -> bool:
    """True when every visible GPU can run the CUDA kernels (or none is visible): compute
    capability 8.0 or newer, and code for it in this build. Otherwise the ops run their references
    on every GPU (one warning names the devices and why): a kernel launched there would fail with
    "no kernel image is available" in the middle of a run."""
    global _cuda_ok
    if _cuda_ok is None:
        count = torch.cuda.device_count()
        current = torch.cuda.current_device() if count else None
        probed: dict[tuple[int, int], bool] = {}  # the current device first: its context exists
        order = sorted(range(count), key=lambda i: i != current)
        problems = sorted((i, p) for i in order if (p := _cuda_device_problem(i, probed)))
        _cuda_ok = not problems
        if problems:
            warnings.warn(f"sgdm: the ops run their PyTorch references on CUDA: "
                          f"{'; '.join(p for _, p in problems)}", RuntimeWarning, stacklevel=3)
    return _cuda_ok


@constant_for_compile
def kernels_enabled(op: str, device_type: str) -> bool:
    """True when op ``op`` has a compiled kernel for ``device_type`` ("cpu", "cuda") that can run:
    for "cuda", on every visible GPU (:func:`cuda_devices_supported`)."""
    found = _enabled.get((op, device_type))
    if found is None:
        found = _registered(op, device_type) and (device_type != "cuda" or cuda_devices_supported())
        _enabled[(op, device_type)] = found
    return found


def call_below_autograd(op, *args):
    """``op(*args)`` below the Autograd dispatch key, for callers that need no graph from it
    (no gradients, or inside their own ``autograd.Function.forward``). Called plainly, an op
    with a ``torch.library.register_autograd`` formula first enters that Python autograd
    kernel only to redispatch: 2.7 us of a 6.7 us GroupNorm call at the small UNet's shapes."""
    if torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def has_cuda_kernels(op: str = "guided_ddim_step") -> bool:
    """True when the extension was built with CUDA (tested on one op), whether or not the visible
    GPUs can run it (:func:`kernels_enabled` says that)."""
    return _registered(op, "cuda")


def cpu_isa() -> str | None:
    """The CPU ISA the kernels run with now ("default", "avx2", "avx512"), None without them."""
    return torch.ops.sgdm._cpu_isa() if load() else None


@contextlib.contextmanager
def force_cpu_isa(name: str) -> Iterator[None]:
    """Runs the CPU kernels compiled for ISA ``name`` inside the block (tests cover every path).

    Raises RuntimeError if the extension is missing, or the ISA is unknown, not compiled
    or not supported by this CPU.
    """
    if not load():
        raise RuntimeError("sgdm: force_cpu_isa needs the compiled extension (sgdm._C)")
    previous = torch.ops.sgdm._set_cpu_isa(name)
    try:
        yield
    finally:
        torch.ops.sgdm._set_cpu_isa(previous)


def backend(op: str, device_type: str = "cpu") -> str:
    """Which implementation ``op`` runs on ``device_type``: "cpu-avx2", "cuda", "reference"..."""
    if not kernels_enabled(op, device_type):
        return "reference"
    return f"cpu-{cpu_isa()}" if device_type == "cpu" else device_type
