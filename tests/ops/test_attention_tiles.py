"""benchmarks/attention_tiles.cu (the forward's tile configurations timed against each other)
still compiles against the kernel headers: it is built by nvcc, not by setup.py, so nothing else
would notice when FwdConfig or the kernel's signature changes. Running it needs a GPU
(``bash benchmarks/gpu_check.sh attention``)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (CUDA_HOME)")
def test_attention_tiles_benchmark_compiles(tmp_path):
    cmd = [_nvcc(), "-std=c++20", "-O1", "--use_fast_math", "--expt-relaxed-constexpr", "-Werror", "all-warnings",
           "-arch=sm_80", "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc", "cuda"),
           os.path.join(ROOT, "benchmarks", "attention_tiles.cu"), "-o", str(tmp_path / "attention_tiles")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "attention_tiles").is_file()
