"""Loading of sgdm._C, the run-time ISA choice and the SGDM_KERNELS=0 fallback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sgdm import ops
from sgdm.ops import _extension
from tests.ops.conftest import require_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs both ops on fixed inputs and reports the backends and results.
PROBE = textwrap.dedent("""
    import json, torch
    from sgdm import ops
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 5, 7, generator=g)
    w, b = torch.randn(12, generator=g), torch.randn(12, generator=g)
    y = ops.group_norm_silu(x, 4, w, b)
    e, u = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    xp, x0 = ops.guided_ddim_step(x, e, 0.3, 0.6, eps_uncond=u, guidance_scale=2.0)
    refused = None
    if ops.backend("cpu")["group_norm_silu"] == "cpu-default":
        try:
            torch.ops.sgdm._set_cpu_isa("avx2")
        except RuntimeError as err:
            refused = str(err)
    print(json.dumps({"backend": ops.backend("cpu"), "y": y.flatten()[::7].tolist(),
                      "x_prev": xp.flatten()[::7].tolist(), "refused": refused}))
""")


def _probe(**env) -> dict:
    full = dict(os.environ, OMP_NUM_THREADS="1", **env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_baseline_isa_and_disabled_kernels_in_fresh_processes():
    """ATEN_CPU_CAPABILITY=default selects the baseline kernels at load time; SGDM_KERNELS=0
    selects the references; both agree with the default choice."""
    require_kernels("group_norm_silu")
    best = _probe()
    baseline = _probe(ATEN_CPU_CAPABILITY="default")
    disabled = _probe(SGDM_KERNELS="0")
    assert baseline["backend"]["group_norm_silu"] == "cpu-default"
    assert baseline["backend"]["guided_ddim_step"] == "cpu-default"
    assert "not supported by this CPU or is disabled by ATEN_CPU_CAPABILITY" in baseline["refused"]
    assert set(disabled["backend"].values()) == {"reference"}
    assert best["backend"]["group_norm_silu"] == f"cpu-{_extension.cpu_isa()}"
    for key in ("y", "x_prev"):
        torch.testing.assert_close(torch.tensor(baseline[key]), torch.tensor(best[key]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(disabled[key]), torch.tensor(best[key]),
                                   rtol=1e-5, atol=1e-5)


def test_backend_reports_each_op():
    report = ops.backend("cpu")
    assert set(report) == {"group_norm_silu", "guided_ddim_step", "attention"}
    if _extension.load():
        assert report["group_norm_silu"].startswith("cpu-")
    assert ops.backend("xla") == {op: "reference" for op in report}


def test_force_cpu_isa_switches_and_restores():
    require_kernels("group_norm_silu")
    before = _extension.cpu_isa()
    with _extension.force_cpu_isa("default"):
        assert _extension.cpu_isa() == "default"
        assert ops.backend()["group_norm_silu"] == "cpu-default"
    assert _extension.cpu_isa() == before


@pytest.mark.parametrize("name,match", [("sse9", "unknown CPU ISA 'sse9'"),
                                        ("avx1024", "unknown CPU ISA")])
def test_force_cpu_isa_rejects_unknown_names(name, match):
    require_kernels("group_norm_silu")
    before = _extension.cpu_isa()
    with pytest.raises(RuntimeError, match=match):
        with _extension.force_cpu_isa(name):
            pass
    assert _extension.cpu_isa() == before



def _fake_gpus(monkeypatch, *capabilities, build_runs=lambda index: True):
    """Visible GPUs with these compute capabilities (a CPU-only machine can stand in for any), and
    whether the build holds code for each."""
    monkeypatch.setattr(_extension, "_enabled", {})
    monkeypatch.setattr(_extension, "_cuda_ok", None, raising=False)
    monkeypatch.setattr(_extension, "_build_runs_on", build_runs, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"gpu{i}")


def _require_cuda_build():
    if not _extension.has_cuda_kernels("attention"):
        pytest.skip("sgdm._C was built without CUDA")


@pytest.mark.parametrize("capabilities", [((7, 5),), ((7, 0),), ((8, 0), (7, 5))],
                         ids=["t4", "v100", "a100+t4"])
def test_gpu_before_compute_capability_8_runs_the_references(monkeypatch, capabilities):
    """The kernels are built for sm_80 and newer: on a T4 or V100 a launch would fail with "no kernel
    image is available", so every op takes its reference there, and one warning says why."""
    _require_cuda_build()
    _fake_gpus(monkeypatch, *capabilities)
    old = next(i for i, c in enumerate(capabilities) if c < (8, 0))
    major, minor = capabilities[old]
    with pytest.warns(RuntimeWarning, match=rf"cuda:{old} \(gpu{old}, compute capability {major}\.{minor}\): "
                      r"the kernels need compute capability 8\.0 or newer"):
        report = ops.backend("cuda")
    assert set(report.values()) == {"reference"}
    assert _extension.has_cuda_kernels()  # built with CUDA all the same
    assert ops.backend("cpu")["attention"] != "reference"


def test_gpu_the_build_has_no_code_for_runs_the_references(monkeypatch):
    """A build for "8.0;9.0" without PTX on a newer GPU (or setup.py's build for the build machine's
    GPU moved to another kind): the build's own probe says no, and the references run."""
    _require_cuda_build()
    _fake_gpus(monkeypatch, (9, 0), (10, 0), build_runs=lambda index: index == 0)
    with pytest.warns(RuntimeWarning, match=r"cuda:1 \(gpu1, compute capability 10\.0\): this build of sgdm "
                      r"has no code for it"):
        assert set(ops.backend("cuda").values()) == {"reference"}


def test_build_probe_asks_one_gpu_per_compute_capability(monkeypatch):
    """The probe makes a CUDA context on the GPU it asks about (hundreds of MiB): it asks the current
    GPU, and another only for a compute capability not seen yet."""
    _require_cuda_build()
    asked = []
    _fake_gpus(monkeypatch, (9, 0), (9, 0), (8, 0), (9, 0), (8, 0), build_runs=lambda i: asked.append(i) or True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert set(ops.backend("cuda").values()) == {"cuda"}
    assert asked == [3, 2]


@pytest.mark.parametrize("capabilities", [(), ((8, 0),), ((8, 6), (8, 9), (9, 0))], ids=["none", "a100", "mixed"])
def test_gpus_from_compute_capability_8_run_the_kernels(monkeypatch, recwarn, capabilities):
    _require_cuda_build()
    _fake_gpus(monkeypatch, *capabilities)
    assert set(ops.backend("cuda").values()) == {"cuda"}
    assert not [w for w in recwarn if "compute capability" in str(w.message)]


@pytest.mark.cuda
def test_build_probe_answers_for_each_visible_gpu():
    """The probe the checks above stand in for: a GPU the tests run on has code in this build."""
    require_kernels("attention", "cuda")
    if not _extension.has_op("_cuda_kernels_run_on"):
        pytest.skip("this build predates sgdm::_cuda_kernels_run_on")
    assert all(torch.ops.sgdm._cuda_kernels_run_on(i) for i in range(torch.cuda.device_count()))
