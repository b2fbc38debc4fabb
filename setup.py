"""Build of sgdm and its compiled extension ``sgdm._C``.

Sources are found by pattern, so adding an op means adding files:
  csrc/*.cpp                op schemas + CPU glue, compiled once
  csrc/cpu/*_kernel.cpp     CPU kernels, compiled once per ISA (baseline, AVX2+FMA,
                            AVX-512 unless SGDM_CPU_AVX512=0; the baseline only with a
                            compiler for another CPU, e.g. aarch64); see csrc/cpu/dispatch.h
  csrc/cpu/*.cpp (others)   CPU helpers, compiled once
  csrc/cuda/*.cu            torch-free CUDA kernels        } only when CUDA is built
  csrc/cuda/*_launch.cpp    torch glue on the current stream }
CUDA is built when FORCE_CUDA=1, or TORCH_CUDA_ARCH_LIST is set, or a GPU and
a toolkit are present. Never -march=native, never -ffast-math.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")

try:
    import torch  # noqa: F401
except ImportError:
    sys.exit("sgdm: torch is not importable here (not installed, or hidden by pip's build "
             "isolation); run `pip install -e . --no-build-isolation` where torch is installed.")

ISA_FLAGS = {
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
# -fopenmp: at::parallel_for is an inline template that only runs in parallel
# when our own translation units are compiled with OpenMP (the loaded runtime
# is torch's libgomp.so.1, so there is one thread pool).
CXX_FLAGS = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-Wno-psabi",
             "-fvisibility=hidden", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
              "-Werror", "all-warnings", "-Xptxas", "-v,-warn-spills,-warn-lmem-usage,-Werror"]

# --exclude-libs,ALL: a compiler that links libstdc++ into the extension statically (the lent GPU
# machine's /opt/gcc did) would otherwise export that copy's symbols, and the dynamic linker binds
# some of them to torch's shared libstdc++: writing a number into an error message then crashed the
# process there (and lost the number here). Kept private, the copy is self-consistent.
LINK_FLAGS = ["-fopenmp"] + (["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else [])


_ON, _OFF = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _switch(name: str) -> bool | None:
    """An on/off environment variable, in any case: True, False, or None where unset or empty."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return None
    if raw not in _ON | _OFF:
        sys.exit(f"sgdm: {name}={os.environ[name]!r}: expected 1 or 0 (or true/false, yes/no, on/off).")
    return raw in _ON


def _arch_entries(arch_list: str) -> list[str]:
    """The entries of an arch list separated by ';', ',' or spaces."""
    return [a for a in re.split(r"[\s;,]+", arch_list) if a]


def _arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST with ';' between entries; '' where unset or blank."""
    return ";".join(_arch_entries(os.environ.get("TORCH_CUDA_ARCH_LIST", "")))


def _cuda_home() -> str | None:
    """The real toolkit root; resolves nvcc wrapper scripts (e.g. /usr/local/bin/nvcc)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for cand in candidates:  # a wrapper's parent (/usr/local) has no CUDA headers
        if os.path.exists(os.path.join(cand, "bin", "nvcc")) and os.path.exists(
                os.path.join(cand, "include", "cuda_runtime.h")):
            return cand
    return None


def _want_cuda(cuda_home: str | None) -> bool:
    force = _switch("FORCE_CUDA")
    if force is False or (force is None and "FORCE_CUDA" in os.environ):  # FORCE_CUDA=0 or FORCE_CUDA=
        return False
    if force or _arch_list():
        return True
    if cuda_home is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# The CUDA kernels use cp.async, ldmatrix and bf16 tensor-core MMAs: compute capability 8.0 or newer.
# Older GPUs (T4, V100) run the PyTorch references (sgdm.ops checks each device at run time).
MIN_KERNEL_ARCH = (8, 0)


def _arch_version(entry: str) -> tuple[int, int]:
    """(major, minor) of an arch list entry such as 8.6, 9.0a, 10.0f or 9.0+PTX; (0, 0) if unreadable."""
    found = re.match(r"(\d+)\.(\d+)", entry)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def _kernel_archs(arch_list: str) -> tuple[str, list[str]]:
    """(the entries of ``arch_list`` the kernels can be built for, joined by ';'; the entries dropped).

    Lists of many architectures are common in containers (e.g. "7.0 7.5 8.0 8.6 9.0+PTX"): the old ones
    are dropped with a note rather than failing the build in ptxas."""
    keep, drop = [], []
    for entry in _arch_entries(arch_list):
        (keep if _arch_version(entry) >= MIN_KERNEL_ARCH else drop).append(entry)
    return ";".join(keep), drop


def _hopper_archs(arch_list: str) -> tuple[str, bool]:
    """(the TORCH_CUDA_ARCH_LIST to build, whether it has 9.0a).

    9.0a code is what the Hopper wgmma attention kernels need (the default on a compute
    capability 9.0 GPU), and it runs everything else as 9.0 code does on the same GPUs (H100,
    H200), so a plain 9.0 is built as 9.0a, and with both in the list the plain 9.0 is dropped:
    one cubin per GPU, no doubt about which the driver loads."""
    archs = _arch_entries(arch_list)
    if "9.0" in archs and "9.0a" not in {a.split("+")[0] for a in archs}:
        archs = ["9.0a" if a == "9.0" else a for a in archs]
    has_a = "9.0a" in {a.split("+")[0] for a in archs}
    if has_a:
        archs = [a for a in archs if a != "9.0"]
    return ";".join(archs), has_a


def _check_cuda(cuda_home: str | None) -> None:
    """Stops with the variable to fix where the CUDA kernels cannot build: no toolkit, a CUDA_HOME
    without nvcc, a CPU-only torch, or an nvcc whose major version is not torch's CUDA."""
    import torch

    var = "CUDA_HOME" if os.environ.get("CUDA_HOME") else "CUDA_PATH" if os.environ.get("CUDA_PATH") else None
    if torch.version.cuda is None:
        sys.exit(f"sgdm: the CUDA kernels were asked for (FORCE_CUDA / TORCH_CUDA_ARCH_LIST) but torch "
                 f"{torch.__version__} is a CPU-only build; install a CUDA build of torch, or set FORCE_CUDA=0.")
    if cuda_home is None:
        sys.exit("sgdm: CUDA build requested but no toolkit found; set CUDA_HOME.")
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    where = f"{var}={cuda_home}" if var else f"the toolkit found at {cuda_home}"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        sys.exit(f"sgdm: {where} has no working bin/nvcc ({err}); set CUDA_HOME to the toolkit root.")
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found and found.group(1) != torch.version.cuda.split(".")[0]:
        sys.exit(f"sgdm: nvcc {found.group(1)}.{found.group(2)} ({where}) does not match torch's CUDA "
                 f"{torch.version.cuda}; set CUDA_HOME to a CUDA {torch.version.cuda.split('.')[0]}.x toolkit.")


def _sources(with_cuda: bool) -> tuple[list[str], list[str]]:
    """(sources compiled once, CPU kernel sources compiled per ISA)."""
    once = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    cpu_all = sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    per_isa = [p for p in cpu_all if p.endswith("_kernel.cpp")]
    once += [p for p in cpu_all if p not in per_isa]
    if with_cuda:
        once += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        once += sorted(glob.glob(os.path.join(CSRC, "cuda", "*_launch.cpp")))
    return [os.path.relpath(p, ROOT) for p in once], per_isa


def _extension():
    jobs = os.environ.get("MAX_JOBS", "").strip()
    if jobs and not (jobs.isdigit() and int(jobs) > 0):  # torch would ignore it and run one job per core
        sys.exit(f"sgdm: MAX_JOBS={os.environ['MAX_JOBS']!r}: expected a number of parallel compile jobs >= 1.")
    cuda_home = _cuda_home()
    with_cuda = _want_cuda(cuda_home)
    if with_cuda:
        _check_cuda(cuda_home)
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension guesses /usr/local
        minimum = "%d.%d" % MIN_KERNEL_ARCH
        if _arch_list():
            archs, dropped = _kernel_archs(_arch_list())
            if not archs:
                sys.exit(f"sgdm: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r} has no architecture the "
                         f"CUDA kernels support ({minimum} or newer); list one, or set FORCE_CUDA=0 to build the "
                         f"CPU kernels only (older GPUs then run the PyTorch references).")
            if dropped:
                print(f"sgdm: TORCH_CUDA_ARCH_LIST: not building for {', '.join(dropped)} (the kernels need "
                      f"{minimum} or newer; such GPUs run the PyTorch references)", file=sys.stderr)
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        else:
            try:
                import torch
                major, minor = torch.cuda.get_device_capability()
            except Exception:  # noqa: BLE001 - no GPU to ask
                sys.exit("sgdm: set TORCH_CUDA_ARCH_LIST (e.g. \"8.0;9.0\") to build CUDA "
                         "without a visible GPU.")
            if (major, minor) < MIN_KERNEL_ARCH:
                print(f"sgdm: the visible GPU has compute capability {major}.{minor}; the CUDA kernels need "
                      f"{minimum} or newer, so only the CPU kernels are built (the GPU runs the PyTorch "
                      f"references; set TORCH_CUDA_ARCH_LIST to build for other GPUs)", file=sys.stderr)
                with_cuda = False
            else:
                suffix = "a" if (major, minor) == (9, 0) else ""  # the wgmma kernels' code
                os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}{suffix}"
    from torch.utils import cpp_extension

    avx512 = _switch("SGDM_CPU_AVX512") is not False
    once, per_isa = _sources(with_cuda)
    macros = [("SGDM_CPU_AVX2", "1"), ("SGDM_CPU_AVX512", "1" if avx512 else "0")]
    include_dirs = [CSRC, os.path.join(CSRC, "include")]
    cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    if with_cuda:
        import torch  # cuBLAS/cuSPARSE headers ship in the nvidia wheels (KERNELS.md)
        nv = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
        if os.path.isdir(nv):
            include_dirs.append(nv)
        macros.append(("SGDM_WITH_CUDA", "1"))
        os.environ["TORCH_CUDA_ARCH_LIST"], sm90a = _hopper_archs(os.environ["TORCH_CUDA_ARCH_LIST"])
        if sm90a:
            macros.append(("SGDM_WITH_SM90A", "1"))
    ext = cls(name="sgdm._C", sources=once, include_dirs=list(include_dirs), define_macros=macros,
              extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=LINK_FLAGS,
              py_limited_api=False)
    # torch's headers as system includes: -Wall/-Werror then apply to our code only.
    torch_dirs = [d for d in ext.include_dirs if d not in include_dirs]
    ext.include_dirs = list(include_dirs)
    for key in ("cxx", "nvcc"):
        ext.extra_compile_args[key] = [f for d in torch_dirs for f in ("-isystem", d)] + \
            ext.extra_compile_args[key]
    ext.sgdm_per_isa_sources = per_isa
    ext.sgdm_isas = ["DEFAULT", "AVX2"] + (["AVX512"] if avx512 else [])
    return ext, cpp_extension


# What a compiler must build (and assemble) for an ISA's kernels to compile; X86 tells an x86
# compiler (whose AVX2 failure is an error) from one for another CPU (which builds the baseline only).
ISA_PROBES = {
    "X86": "#if !defined(__x86_64__) && !defined(__i386__)\n#error not x86\n#endif\nint f(void) { return 0; }\n",
    "AVX2": "#include <immintrin.h>\n__m256 f(__m256 a, __m256 b) { return _mm256_fmadd_ps(a, b, a); }\n",
    "AVX512": "#include <immintrin.h>\n__m512 f(__m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, a); }\n",
}


def _isa_compiles(compiler: list[str], isa: str) -> bool:
    """Whether ``compiler`` builds an object with ``isa``'s flags (DEFAULT always does)."""
    if isa not in ISA_PROBES:
        return True
    flags = [f for f in ISA_FLAGS.get(isa, []) if f.startswith("-m")]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*compiler, *flags, "-x", "c++", "-c", "-", "-o", os.path.join(tmp, "probe.o")]
        try:
            return subprocess.run(cmd, input=ISA_PROBES[isa], capture_output=True, text=True,
                                  timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def _set_macro(ext, key: str, value: str) -> None:
    ext.define_macros = [(k, value if k == key else v) for k, v in ext.define_macros]


def _buildable_isas(ext, compiler: list[str]) -> None:
    """Leaves AVX-512 out of ``ext`` (with a note) where the compiler cannot build it, unless
    SGDM_CPU_AVX512=1 asked for it. A compiler for another CPU than x86 (aarch64, e.g. Grace
    Hopper) builds the baseline kernels only, which ATen vectorises there (NEON); an x86 compiler
    that cannot build AVX2 stops the build."""
    name = " ".join(compiler)
    if "AVX2" in ext.sgdm_isas and not _isa_compiles(compiler, "X86"):
        if _switch("SGDM_CPU_AVX512"):
            sys.exit(f"sgdm: SGDM_CPU_AVX512=1 but the C++ compiler ({name}) does not target x86; unset it.")
        print(f"sgdm: the C++ compiler ({name}) does not target x86: building the baseline CPU kernels only "
              "(no AVX2 / AVX-512 variants).", file=sys.stderr)
        ext.sgdm_isas = ["DEFAULT"]
        _set_macro(ext, "SGDM_CPU_AVX2", "0")
        _set_macro(ext, "SGDM_CPU_AVX512", "0")
        return
    if "AVX512" in ext.sgdm_isas and not _isa_compiles(compiler, "AVX512"):
        if _switch("SGDM_CPU_AVX512"):
            sys.exit(f"sgdm: SGDM_CPU_AVX512=1 but the C++ compiler ({name}) cannot build AVX-512 code "
                     f"({' '.join(ISA_FLAGS['AVX512'][2:])}); set SGDM_CPU_AVX512=0 or use a newer compiler.")
        print(f"sgdm: the C++ compiler ({name}) cannot build AVX-512 code; building without the AVX-512 "
              "CPU kernels, as SGDM_CPU_AVX512=0 does.", file=sys.stderr)
        ext.sgdm_isas.remove("AVX512")
        _set_macro(ext, "SGDM_CPU_AVX512", "0")
    if "AVX2" in ext.sgdm_isas and not _isa_compiles(compiler, "AVX2"):
        sys.exit(f"sgdm: the C++ compiler ({name}) cannot build AVX2+FMA code, which every build's CPU "
                 "kernels on x86 need (csrc/cpu/dispatch.h); use a newer compiler.")


def _build_ext_class(cpp_extension):
    class BuildExtension(cpp_extension.BuildExtension):
        """Compiles csrc/cpu/*_kernel.cpp once per ISA, then links everything."""

        def build_extension(self, ext):
            per_isa = getattr(ext, "sgdm_per_isa_sources", [])
            if per_isa:  # the compiler the sources go through: ninja's CXX, else distutils' own
                _buildable_isas(ext, [cpp_extension.get_cxx_compiler()] if self.use_ninja
                                else list(self.compiler.compiler_so))
            for isa in getattr(ext, "sgdm_isas", []):
                if not per_isa:
                    break
                cxx = list(ext.extra_compile_args["cxx"]) + ISA_FLAGS[isa]
                ext.extra_objects += self.compiler.compile(
                    per_isa, output_dir=os.path.join(self.build_temp, "isa_" + isa.lower()),
                    macros=ext.define_macros, include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": cxx, "nvcc": []}, depends=ext.depends)
            super().build_extension(ext)

    return BuildExtension.with_options(no_python_abi_suffix=False)


_ext, _cpp = _extension()
setup(ext_modules=[_ext], cmdclass={"build_ext": _build_ext_class(_cpp)})
