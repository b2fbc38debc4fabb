"""The standalone CUDA attention A/B programs still compile against the kernel headers: they are
built by nvcc, not by setup.py, so nothing else would notice when a kernel's signature or a config
changes. Running them needs a GPU (``bash benchmarks/gpu_check.sh attention``).

- benchmarks/attention_tiles.cu: the forward's tile configurations against the production FwdTile.
- benchmarks/attention_wgmma.cu: the Hopper wgmma forward (csrc/cuda/attention_wgmma.cuh) against
  the production mma.sync forward. It targets sm_90a only; ptxas must place every register array
  in registers (no stack frame) and keep the wgmma's asynchronous (no "serialized" advisory, which
  it gives when an instruction redefines an MMA's register while it may run): either would make
  the kernel slower than the one it is meant to replace, with no error to show it.
- benchmarks/attention_wgmma.cu also holds the wgmma backward (csrc/cuda/attention_wgmma_bwd.cuh)
  against the production mma.sync backward, under the same rules.
- csrc/cuda/attention_hopper.cu: the same kernels as the extension builds them (the default on Hopper),
  checked the same way, and a trap on any target other than sm_90a.
- tests/ops/cuda_host/: host programs. wgmma_layouts.cu checks every operand descriptor against the
  PTX ISA's canonical layouts; wgmma_emulator.cpp runs both wgmma kernels on the CPU and checks what
  they compute."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def _compile(program: str, arch: list[str], tmp_path, *extra: str) -> subprocess.CompletedProcess:
    """nvcc ``program`` (a path under the repository root) into tmp_path/program."""
    cmd = [_nvcc(), "-std=c++20", "-O1", "--use_fast_math", "--expt-relaxed-constexpr", "-Werror", "all-warnings",
           *arch, *extra, "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc", "cuda"),
           os.path.join(ROOT, program), "-o", str(tmp_path / "program")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "program").is_file()
    return done


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (CUDA_HOME)")
def test_attention_tiles_program_compiles(tmp_path):
    _compile("benchmarks/attention_tiles.cu", ["-arch=sm_80"], tmp_path)


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (CUDA_HOME)")
def test_attention_wgmma_program_compiles_for_sm90a_with_registers_only(tmp_path):
    done = _compile("benchmarks/attention_wgmma.cu", ["-gencode", "arch=compute_90a,code=sm_90a"], tmp_path,
                    "-Xptxas", "-v")
    frames = re.findall(r"Function properties for (\S+)\n.*?(\d+) bytes stack frame", done.stderr)
    wgmma = [(name, int(size)) for name, size in frames if "attention_fwd_wgmma" in name]
    assert len(wgmma) >= 6, done.stderr[-3000:]
    backward = [(name, int(size)) for name, size in frames if "attention_bwd_wgmma" in name]
    assert len(backward) >= 5, done.stderr[-3000:]
    wgmma += backward
    assert all(size == 0 for _, size in wgmma), [name for name, size in wgmma if size]
    assert "wgmma.mma_async instructions are serialized" not in done.stderr, done.stderr[-3000:]


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (CUDA_HOME)")
def test_wgmma_operands_are_read_where_the_tiles_hold_them(tmp_path):
    """tests/ops/cuda_host/wgmma_layouts.cu runs on the CPU: it decodes every descriptor the wgmma
    forward builds (Q, K, V; every k-step, warpgroup and buffer; D = 32, 64, 128) and every one the
    backward builds (K and V rows, Q and dO both ways, dS^T M-major, K for dQ by column chunk) with
    the PTX ISA's canonical layouts and checks each element against where the tile loader (or the
    dS^T store) put it."""
    _compile("tests/ops/cuda_host/wgmma_layouts.cu", ["-gencode", "arch=compute_90a,code=sm_90a"], tmp_path)
    done = subprocess.run([str(tmp_path / "program")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "every operand element is where the instruction reads it" in done.stdout


def _entries(stderr: str) -> dict[str, list[tuple[str, int]]]:
    """ptxas -v: arch -> (kernel, registers) of each kernel compiled for it."""
    found: dict[str, list[tuple[str, int]]] = {}
    for name, arch, regs in re.findall(r"Compiling entry function '(\S+)' for '(sm_\w+)'.*?Used (\d+) registers",
                                       stderr, flags=re.S):
        found.setdefault(arch, []).append((name, int(regs)))
    return found


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (CUDA_HOME)")
def test_extension_wgmma_forward_is_sm90a_code_only_in_a_90a_build(tmp_path):
    """csrc/cuda/attention_hopper.cu as setup.py compiles it for "8.0;9.0a" (which defines
    SGDM_WITH_SM90A): ten forward kernels (fp16 / bf16 x D, two configurations each for D = 32 and
    64: full grids and grids under one wave) and eight backward ones (two for D = 64), MMAs
    asynchronous and in registers for sm_90a, a trap for sm_80. Without 9.0a in the list it holds
    no kernel."""
    archs = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
    flags = ["-c", "-I", os.path.join(ROOT, "csrc"), "-Xptxas", "-v"]
    done = _compile("csrc/cuda/attention_hopper.cu", archs, tmp_path, *flags, "-DSGDM_WITH_SM90A=1")
    entries = _entries(done.stderr)
    assert sorted(entries) == ["sm_80", "sm_90a"], done.stderr[-3000:]
    for arch, kernels in entries.items():
        wgmma = [regs for name, regs in kernels if "_wgmma" in name]
        assert len(wgmma) == 18, (arch, kernels)
        assert all(regs <= 16 for regs in wgmma) if arch == "sm_80" else all(regs >= 64 for regs in wgmma), \
            (arch, kernels)  # sm_80: __trap() alone
    frames = re.findall(r"Function properties for (\S+)\n.*?(\d+) bytes stack frame", done.stderr)
    assert len(frames) >= 36 and all(int(size) == 0 for _, size in frames), frames
    assert "wgmma.mma_async instructions are serialized" not in done.stderr, done.stderr[-3000:]

    plain = _compile("csrc/cuda/attention_hopper.cu", ["-gencode", "arch=compute_80,code=sm_80"], tmp_path, *flags)
    assert _entries(plain.stderr) == {}, plain.stderr[-3000:]


def _cuda_include() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "include")
    return path if os.path.exists(os.path.join(path, "cuda_bf16.h")) else None


@pytest.mark.skipif(_cuda_include() is None or shutil.which("g++") is None,
                    reason="needs g++ and the CUDA headers (CUDA_HOME)")
def test_wgmma_kernels_compute_attention_in_the_cpu_emulation(tmp_path):
    """tests/ops/cuda_host/wgmma_emulator.cpp runs the wgmma forward and backward, source unchanged,
    on the CPU: each CUDA thread a host thread, each wgmma computed from its operands by the PTX
    ISA's layouts (tests/ops/cuda_host/wgmma_emulation.h), the results against float64 attention
    and its gradients. The extension's configurations and the harness's, partial blocks, fp16 and
    bf16; each wgmma completing at issue, then at the wait that covers it, then with each cp.async
    also landing at its wait. Mutating the kernels' dS^T store, key mask, dQ ownership or block loop
    fails it; so does a wait that lets a product run past the reads of its result (only the second
    and third modes see that), or a cp.async wait that leaves the group of a tile about to be read
    in flight (copies_landed<1> for <0> in the backward, <2> for <1> in the forward's loop: only the
    third mode sees that), or a missing fence.proxy.async after the copies or after the backward's
    dS^T stores (every operand a wgmma reads is checked against what the last fence published)."""
    program = tmp_path / "wgmma_emulator"
    cmd = ["g++", "-std=c++20", "-O2", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wno-unused-parameter",
           "-Wno-unknown-pragmas", "-Werror", "-pthread", "-I", _cuda_include(),
           "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc", "cuda"),
           os.path.join(ROOT, "tests", "ops", "cuda_host", "wgmma_emulator.cpp"), "-o", str(program)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    done = subprocess.run([str(program)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "the wgmma kernels compute attention and its gradients" in done.stdout
    assert "UNFENCED" not in done.stdout
    assert done.stdout.count("max rel err") == 3 * (13 * 2 + 7 * 3)  # every check ran, in all three modes
