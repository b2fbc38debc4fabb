"""setup.py's configuration: environment switches, TORCH_CUDA_ARCH_LIST, toolkit checks and the
per-ISA compiler probe (setup() itself is replaced: nothing is compiled but the probe's few lines)."""
from __future__ import annotations

import os
import pathlib
import platform
import runpy
import shutil
import stat
import subprocess
import sys
import types

import pytest
import setuptools
import torch

SETUP = pathlib.Path(__file__).resolve().parents[1] / "setup.py"
VARIABLES = ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH", "SGDM_CPU_AVX512", "MAX_JOBS")


def configure(monkeypatch, **env):
    """Runs setup.py with ``env`` (the build variables not named are unset): (extension, setup.py's globals)."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setattr(sys, "argv", ["setup.py", "--name"])
    namespace = runpy.run_path(str(SETUP), run_name="__main__")
    return captured["ext_modules"][0], namespace


def executable(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("off", ["0", "false", "OFF", "No", ""])
def test_force_cuda_off_in_any_spelling_wins_over_the_arch_list(monkeypatch, off):
    ext, _ = configure(monkeypatch, FORCE_CUDA=off, TORCH_CUDA_ARCH_LIST="8.0")
    assert ("SGDM_WITH_CUDA", "1") not in ext.define_macros


def test_avx512_switch_in_any_case(monkeypatch):
    ext, _ = configure(monkeypatch, FORCE_CUDA="0", SGDM_CPU_AVX512="OFF")
    assert ext.sgdm_isas == ["DEFAULT", "AVX2"] and ("SGDM_CPU_AVX512", "0") in ext.define_macros
    ext, _ = configure(monkeypatch, FORCE_CUDA="0")
    assert ext.sgdm_isas == ["DEFAULT", "AVX2", "AVX512"] and ("SGDM_CPU_AVX512", "1") in ext.define_macros


@pytest.mark.parametrize("name", ["FORCE_CUDA", "SGDM_CPU_AVX512"])
def test_unknown_switch_value_names_the_variable(monkeypatch, name):
    with pytest.raises(SystemExit, match=f"{name}='maybe': expected 1 or 0"):
        configure(monkeypatch, **{"FORCE_CUDA": "0", name: "maybe"})


@pytest.mark.parametrize("jobs", ["two", "0", "-1"])
def test_max_jobs_must_be_a_positive_number(monkeypatch, jobs):
    with pytest.raises(SystemExit, match=f"MAX_JOBS='{jobs}': expected a number"):
        configure(monkeypatch, FORCE_CUDA="0", MAX_JOBS=jobs)
    configure(monkeypatch, FORCE_CUDA="0", MAX_JOBS="2")


def test_arch_list_separators_and_9_0a(monkeypatch):
    _, g = configure(monkeypatch, FORCE_CUDA="0")
    assert g["_hopper_archs"]("8.0;9.0a") == ("8.0;9.0a", True)
    assert g["_hopper_archs"]("8.0,9.0a") == ("8.0;9.0a", True)
    assert g["_hopper_archs"](" 9.0 , 9.0a+PTX ") == ("9.0a+PTX", True)
    assert g["_hopper_archs"]("9.0") == ("9.0a", True)  # the same GPUs, with the wgmma kernels
    assert g["_hopper_archs"]("8.0;9.0;10.0") == ("8.0;9.0a;10.0", True)
    assert g["_hopper_archs"]("9.0+PTX") == ("9.0+PTX", False)
    assert g["_hopper_archs"]("8.6+PTX") == ("8.6+PTX", False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0, 9.0a")
    assert g["_arch_list"]() == "8.0;9.0a"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", " ")  # blank: as unset, not "build CUDA for nothing"
    assert g["_arch_list"]() == "" and g["_want_cuda"](None) is False


def test_arch_entries_below_8_0_are_dropped(monkeypatch):
    _, g = configure(monkeypatch, FORCE_CUDA="0")
    # a container's list: the kernels need cp.async and bf16 MMAs, which 7.x GPUs lack (ptxas failed)
    assert g["_kernel_archs"]("5.2 6.0 7.0 7.5 8.0 8.6 9.0+PTX") == ("8.0;8.6;9.0+PTX", ["5.2", "6.0", "7.0", "7.5"])
    assert g["_kernel_archs"]("8.9;9.0a;10.0f;12.0") == ("8.9;9.0a;10.0f;12.0", [])
    assert g["_kernel_archs"]("7.5") == ("", ["7.5"])


needs_toolkit = pytest.mark.skipif(torch.version.cuda is None or not os.path.exists("/usr/local/cuda/bin/nvcc"),
                                   reason="needs a CUDA build of torch and a toolkit at /usr/local/cuda")


@needs_toolkit
def test_an_arch_list_of_old_gpus_only_names_the_variable(monkeypatch):
    with pytest.raises(SystemExit, match=r"TORCH_CUDA_ARCH_LIST='7.0;7.5' has no architecture the CUDA kernels "
                                         r"support \(8.0 or newer\).*FORCE_CUDA=0"):
        configure(monkeypatch, CUDA_HOME="/usr/local/cuda", TORCH_CUDA_ARCH_LIST="7.0;7.5")


@needs_toolkit
def test_old_entries_of_an_arch_list_are_left_out_with_a_note(monkeypatch, capsys):
    ext, _ = configure(monkeypatch, CUDA_HOME="/usr/local/cuda", TORCH_CUDA_ARCH_LIST="7.5 8.0 9.0a")
    assert ("SGDM_WITH_CUDA", "1") in ext.define_macros and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0a"
    assert "not building for 7.5" in capsys.readouterr().err


@needs_toolkit
def test_a_visible_gpu_older_than_8_0_builds_the_cpu_kernels_only(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))  # a T4
    ext, _ = configure(monkeypatch, CUDA_HOME="/usr/local/cuda", FORCE_CUDA="1")
    assert ("SGDM_WITH_CUDA", "1") not in ext.define_macros
    assert not any(str(src).endswith(".cu") for src in ext.sources)
    assert "compute capability 7.5; the CUDA kernels need 8.0 or newer" in capsys.readouterr().err


@pytest.fixture
def check_cuda(monkeypatch):
    _, g = configure(monkeypatch, FORCE_CUDA="0")
    return g["_check_cuda"]


def fake_toolkit(root: pathlib.Path, release: str) -> str:
    (root / "bin").mkdir(parents=True)
    executable(root / "bin" / "nvcc", f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    return str(root)


def test_check_cuda_names_the_variable(check_cuda, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match=r"CUDA_HOME=.*missing has no working bin/nvcc"):
        check_cuda(str(tmp_path / "missing"))
    home = fake_toolkit(tmp_path / "cuda-12.4", "12.4")
    monkeypatch.setenv("CUDA_HOME", home)
    with pytest.raises(SystemExit, match=r"nvcc 12.4 \(CUDA_HOME=.*cuda-12.4\) does not match torch's CUDA 13.0"):
        check_cuda(home)
    check_cuda(fake_toolkit(tmp_path / "cuda-13.2", "13.2"))  # a minor difference is torch's warning, not ours
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SystemExit, match="is a CPU-only build"):
        check_cuda(home)


needs_x86_cxx = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("c++"),
                                   reason="needs an x86-64 c++")


@needs_x86_cxx
def test_a_compiler_without_avx512_drops_that_isa_unless_asked_for(monkeypatch, tmp_path, capsys):
    _, g = configure(monkeypatch, FORCE_CUDA="0")
    no_avx512 = executable(tmp_path / "cxx", '#!/bin/sh\nfor a in "$@"; do case "$a" in -mavx512*) '
                                             'echo "unrecognized $a" >&2; exit 1;; esac; done\nexec c++ "$@"\n')
    assert g["_isa_compiles"](["c++"], "AVX2") and not g["_isa_compiles"]([no_avx512], "AVX512")

    def ext():
        return types.SimpleNamespace(sgdm_isas=["DEFAULT", "AVX2", "AVX512"],
                                     define_macros=[("SGDM_CPU_AVX512", "1"), ("SGDM_WITH_CUDA", "1")])

    e = ext()
    g["_buildable_isas"](e, [no_avx512])
    assert e.sgdm_isas == ["DEFAULT", "AVX2"]
    assert e.define_macros == [("SGDM_CPU_AVX512", "0"), ("SGDM_WITH_CUDA", "1")]
    assert "cannot build AVX-512 code" in capsys.readouterr().err
    monkeypatch.setenv("SGDM_CPU_AVX512", "1")
    with pytest.raises(SystemExit, match="SGDM_CPU_AVX512=1 but the C.. compiler .* cannot build AVX-512"):
        g["_buildable_isas"](ext(), [no_avx512])
    e = ext()
    g["_buildable_isas"](e, ["c++"])  # a compiler that can: nothing changes
    assert e.sgdm_isas == ["DEFAULT", "AVX2", "AVX512"]


def test_an_x86_compiler_without_avx2_stops_the_build(monkeypatch, tmp_path):
    _, g = configure(monkeypatch, FORCE_CUDA="0")
    no_avx2 = executable(tmp_path / "cxx", '#!/bin/sh\nfor a in "$@"; do case "$a" in -mavx*) exit 1;; esac; done\n'
                                           'exec c++ "$@"\n')
    e = types.SimpleNamespace(sgdm_isas=["DEFAULT", "AVX2"],
                              define_macros=[("SGDM_CPU_AVX2", "1"), ("SGDM_CPU_AVX512", "0")])
    with pytest.raises(SystemExit, match="cannot build AVX2.FMA code"):
        g["_buildable_isas"](e, [no_avx2])


@needs_x86_cxx
def test_a_compiler_for_another_cpu_builds_the_baseline_kernels_only(monkeypatch, tmp_path, capsys):
    """aarch64 (Grace Hopper): no AVX variants, SGDM_CPU_AVX2=0 for every source; asking for AVX-512 stops."""
    _, g = configure(monkeypatch, FORCE_CUDA="0")
    other_cpu = executable(tmp_path / "cxx", '#!/bin/sh\nexec c++ -U__x86_64__ -U__i386__ "$@"\n')
    assert not g["_isa_compiles"]([other_cpu], "X86") and g["_isa_compiles"](["c++"], "X86")

    def ext():
        return types.SimpleNamespace(sgdm_isas=["DEFAULT", "AVX2", "AVX512"], define_macros=[
            ("SGDM_CPU_AVX2", "1"), ("SGDM_CPU_AVX512", "1"), ("SGDM_WITH_CUDA", "1")])

    e = ext()
    g["_buildable_isas"](e, [other_cpu])
    assert e.sgdm_isas == ["DEFAULT"]
    assert e.define_macros == [("SGDM_CPU_AVX2", "0"), ("SGDM_CPU_AVX512", "0"), ("SGDM_WITH_CUDA", "1")]
    assert "does not target x86: building the baseline CPU kernels only" in capsys.readouterr().err
    monkeypatch.setenv("SGDM_CPU_AVX512", "1")
    with pytest.raises(SystemExit, match="SGDM_CPU_AVX512=1 but the C.. compiler .* does not target x86"):
        g["_buildable_isas"](ext(), [other_cpu])


DISPATCH_PROGRAM = """
#include "cpu/dispatch.h"
SGDM_CPU_DECLARE(int, plus_one, (int))
namespace sgdm::cpu::DEFAULT { int plus_one(int x) { return x + 1; } }
namespace sgdm::cpu { Isa active_isa() { return Isa::kAvx2; } }
int main() { return SGDM_CPU_DISPATCH(plus_one, 41) == 42 ? 0 : 1; }
"""


@pytest.mark.skipif(not shutil.which("c++"), reason="needs a c++")
def test_dispatch_without_avx2_declares_and_calls_the_baseline_only(tmp_path):
    """SGDM_CPU_AVX2=0: a build with only the baseline kernels links (no AVX2 copy is referenced) and
    runs them whatever ISA is active; with AVX2 on, the same program needs the AVX2 copy."""
    import subprocess

    source = tmp_path / "dispatch.cpp"
    source.write_text(DISPATCH_PROGRAM)
    csrc = str(SETUP.parent / "csrc")

    def build(*defines):
        exe = tmp_path / "prog"
        out = subprocess.run(["c++", "-std=c++20", f"-I{csrc}", *defines, str(source), "-o", str(exe)],
                             capture_output=True, text=True, timeout=120)
        return out, exe

    out, exe = build("-DSGDM_CPU_AVX2=0")
    assert out.returncode == 0, out.stderr
    assert subprocess.run([str(exe)], timeout=30).returncode == 0
    out, _ = build()  # AVX2 on by default: the AVX2 copy is called and is missing here
    assert out.returncode != 0 and "AVX2::plus_one" in out.stderr
    out, _ = build("-DSGDM_CPU_AVX2=0", "-DSGDM_CPU_AVX512=1")
    assert out.returncode != 0 and "SGDM_CPU_AVX512=1 needs SGDM_CPU_AVX2=1" in out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None, reason="needs g++ on Linux")
def test_a_statically_linked_libstdcxx_stays_private(monkeypatch, tmp_path):
    """A compiler that links libstdc++ into the extension statically (the lent GPU machine's /opt/gcc)
    exported that copy's symbols, and some were bound to torch's shared libstdc++: a number written into
    an error message crashed the process there. setup.py links with --exclude-libs,ALL; a small library
    linked that way, loaded after torch, formats the number (linked without it, here, it lost it)."""
    ext, _ = configure(monkeypatch, FORCE_CUDA="0")
    assert "-Wl,--exclude-libs,ALL" in ext.extra_link_args
    src = tmp_path / "fmt.cpp"
    src.write_text('#include <cstring>\n#include <sstream>\n'
                   'extern "C" void fmt(char* out) { std::ostringstream s; s << "n=" << 42L; '
                   'std::strcpy(out, s.str().c_str()); }\n')
    lib = tmp_path / "libfmt.so"
    built = subprocess.run(["g++", "-shared", "-fPIC", "-O1", "-static-libstdc++", *ext.extra_link_args, str(src),
                            "-o", str(lib)], capture_output=True, text=True)
    if built.returncode != 0 and "lstdc++" in built.stderr:
        pytest.skip("no static libstdc++ (libstdc++.a) for this g++")
    assert built.returncode == 0, built.stderr
    code = ("import torch, ctypes, sys; out = ctypes.create_string_buffer(32); "
            "ctypes.CDLL(sys.argv[1]).fmt(out); print(out.value.decode())")
    done = subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "n=42", done.stdout + done.stderr
