"""``sgdm-ldm info``: the installation report and ``--check`` (sgdm.environment, sgdm.ops.selfcheck)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from sgdm import ops
from sgdm.cli.main import main
from sgdm.ops import _extension
from sgdm.ops.selfcheck import OPS, check_ops

needs_kernels = pytest.mark.skipif(not _extension.load(), reason="needs the compiled extension")


def _info(capsys, *argv):
    code = main(["info", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@needs_kernels
def test_report_names_the_build_this_process_runs(capsys):
    code, out, _ = _info(capsys)
    assert code == 0
    assert f"extension      loaded ({_extension.__file__.rsplit('/ops/', 1)[0]}" in out
    assert f"CPU kernels    {_extension.cpu_isa()} (default: runs" in out
    cpu = ops.backend("cpu")
    assert "ops on cpu     " + ", ".join(f"{op}: {b}" for op, b in cpu.items()) in out
    assert f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})" in out


@pytest.mark.parametrize("value, says", [(None, "built (fp16 / bf16 on compute 9.0 GPUs; SGDM_ATTENTION_WGMMA=0"),
                                         ("0", "built, off (SGDM_ATTENTION_WGMMA=0)")])
def test_report_says_whether_the_hopper_kernels_run(value, says):
    """The wgmma attention kernels are the default on a compute capability 9.0 GPU: the report says
    so, or that SGDM_ATTENTION_WGMMA=0 turned them off (the build's own state is faked: CI has no 9.0a)."""
    from sgdm.environment import collect, format_report

    info = collect()
    info.update(cuda_kernels=True, wgmma_kernels=True, env=dict(info["env"], SGDM_ATTENTION_WGMMA=value))
    assert f"CUDA kernels   built, Hopper wgmma attention {says}" in format_report(info)
    info.update(wgmma_kernels=False)
    assert "CUDA kernels   built, Hopper wgmma attention not built (no 9.0a)" in format_report(info)


def test_json_holds_versions_backends_and_environment(capsys, monkeypatch):
    monkeypatch.setenv("SGDM_ATTENTION_WGMMA", "1")
    code, out, _ = _info(capsys, "--json")
    info = json.loads(out)
    assert code == 0 and "checks" not in info
    assert info["versions"]["torch"] == torch.__version__ and info["backends"]["cpu"] == ops.backend("cpu")
    assert info["env"]["SGDM_ATTENTION_WGMMA"] == "1" and info["env"]["SGDM_KERNELS"] is None
    assert info["gpus"] == [] or torch.cuda.is_available()


def test_offline_files_are_found_in_the_torch_hub_cache(capsys, monkeypatch, tmp_path):
    from sgdm.evaluation.fidelity import INCEPTION_FILE

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    key = "fid_inception (eval: fid, is, kid)"
    assert json.loads(_info(capsys, "--json")[1])["offline_files"][key] is None
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / INCEPTION_FILE).write_bytes(b"weights")
    _, out, _ = _info(capsys)
    assert f"{key}: {tmp_path / 'hub' / 'checkpoints' / INCEPTION_FILE}" in out


def test_check_runs_every_op_and_dtype_on_the_cpu(capsys):
    code, out, _ = _info(capsys, "--check", "--device", "cpu", "--json")
    checks = json.loads(out)["checks"]
    assert code == 0 and all(c["ok"] for c in checks)
    assert {(c["op"], c["dtype"]) for c in checks} == {(op, d) for op in OPS for d in ("float32", "bfloat16")}
    assert all(c["backend"] == ops.backend("cpu")[c["op"]] for c in checks)


@pytest.mark.parametrize("fault", ["offset", "nan"])
def test_check_fails_on_a_wrong_or_non_finite_op(capsys, monkeypatch, fault):
    real = ops.attention

    def broken(q, k, v, scale=None):
        out = real(q, k, v, scale)
        return out + 0.1 if fault == "offset" else out * float("nan")

    monkeypatch.setattr(ops, "attention", broken)
    code, out, err = _info(capsys, "--check", "--device", "cpu")
    assert code == 1
    assert "sgdm-ldm info: 6 of 20 op checks failed: attention fwd+bwd 2x3 Nq=77 Nk=130 D=32 on cpu float32" in err
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith(OPS)]
    assert len(lines) == 20 and all(line.endswith("FAIL") == line.startswith("attention") for line in lines)


def test_check_on_cuda_without_a_gpu_is_a_config_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _info(capsys, "--check", "--device", "cuda")
    assert code == 2 and "--device: cuda, but this process sees no GPU" in err
    code, out, err = _info(capsys, "--device", "cpu")
    assert code == 2 and "--device: chooses where --check runs; add --check" in err and not out


def test_selfcheck_refuses_unknown_ops_and_dtypes():
    with pytest.raises(ValueError, match=r"op_names: unknown ops \['groupnorm'\]"):
        check_ops("cpu", op_names=["groupnorm"])
    with pytest.raises(ValueError, match=r"dtypes: torch.float64 is not checked"):
        check_ops("cpu", dtypes=[torch.float64])


def test_disabled_kernels_are_reported():
    env = {**os.environ, "SGDM_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-m", "sgdm.cli.main", "info"], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "extension      disabled by SGDM_KERNELS=0" in out
    assert "ops on cpu     group_norm_silu: reference, guided_ddim_step: reference, attention: reference" in out


def test_every_variable_sgdm_reads_at_run_time_is_reported(capsys, monkeypatch):
    import pathlib
    import re

    from sgdm.environment import ENV_VARS

    root = pathlib.Path(__file__).resolve().parents[1]
    read = set()
    for path in (root / "sgdm").rglob("*.py"):
        read |= set(re.findall(r"environ(?:\.get)?[(\[]\s*[\"'](SGDM_\w+)", path.read_text()))
    for path in (root / "csrc").rglob("*.c*"):
        read |= set(re.findall(r"getenv\(\"(SGDM_\w+)\"\)", path.read_text()))
    assert "SGDM_KERNELS" in read and "SGDM_CACHE" in read  # the scan finds both spellings
    assert read <= set(ENV_VARS), f"read but not reported by info: {sorted(read - set(ENV_VARS))}"
    # ATen reads it, and it decides which of the CPU kernels run (README: it forces one)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.setenv("SGDM_CACHE", "/data/cache")
    info = json.loads(_info(capsys, "--json")[1])
    assert info["env"]["ATEN_CPU_CAPABILITY"] == "default" and info["env"]["SGDM_CACHE"] == "/data/cache"
    # SGDM_OFFLINE only makes eval refuse FID/IS/KID early without the Inception weights; timm still downloads
    assert "Inception" in ENV_VARS["SGDM_OFFLINE"] and "no downloads" not in ENV_VARS["SGDM_OFFLINE"]


def test_an_isa_capped_by_aten_cpu_capability_is_not_called_unsupported():
    """Under ATEN_CPU_CAPABILITY=default, info said "avx2: not supported by this CPU" on an AVX2 machine."""
    from sgdm.ops import _extension

    if not _extension.load():
        pytest.skip("needs the compiled extension")
    code = "import json; from sgdm.environment import _cpu_isas; print(json.dumps(_cpu_isas(True)))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    isas = json.loads(out.stdout.strip().splitlines()[-1])
    assert isas["active"] == "default" and isas["isas"]["default"] == "runs"
    for name in ("avx2", "avx512"):
        assert isas["isas"][name] in ("not built",
                                      "not allowed by ATEN_CPU_CAPABILITY=default (or not supported by this CPU)")
