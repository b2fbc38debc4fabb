"""Fixtures for the op tests: every kernel test runs on each CPU ISA path
(baseline, AVX2 and AVX-512 where the CPU and build allow it, forced in-process
through sgdm.ops._extension) and on CUDA when a GPU is present."""
from __future__ import annotations

import os

import pytest
import torch

from sgdm.ops import _extension

CPU_ISAS = ("default", "avx2", "avx512")  # in increasing order


def cpu_isa_available(isa: str) -> bool:
    """True when the build has ISA ``isa`` and the CPU (and ATEN_CPU_CAPABILITY) allow it."""
    best = _extension.cpu_isa()
    return best is not None and CPU_ISAS.index(isa) <= CPU_ISAS.index(best)

TARGETS = [pytest.param(("cpu", isa), id=f"cpu-{isa}") for isa in CPU_ISAS] + [
    pytest.param(("cuda", None), id="cuda", marks=pytest.mark.cuda)]


def require_kernels(op: str, device_type: str = "cpu") -> None:
    """Skips when the extension (or this op's kernel for the device) is missing;
    fails instead under SGDM_REQUIRE_KERNELS=1 (CI), so a broken build cannot pass."""
    if _extension.kernels_enabled(op, device_type):
        return
    msg = (f"sgdm._C has no {device_type} kernel for {op} that runs here (not built, SGDM_KERNELS=0, "
           "or a GPU older than compute capability 8.0)")
    if os.environ.get("SGDM_REQUIRE_KERNELS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(params=TARGETS)
def target(request):
    """(device, isa): the device to run on; on CPU the ISA is forced for the test."""
    device, isa = request.param
    if device == "cpu" and _extension.load():
        if not cpu_isa_available(isa):
            pytest.skip(f"this CPU, build or ATEN_CPU_CAPABILITY does not allow {isa}")
        with _extension.force_cpu_isa(isa):
            yield device
    else:
        yield device
