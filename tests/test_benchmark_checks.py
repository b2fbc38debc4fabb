"""benchmarks/: a candidate checked against its baseline before it is timed, errors that
fail loudly and name the argument, small modes, JSON output, and gpu_check.sh's time budget (run
here with stub commands: no GPU, no build)."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tests.test_benchmarks import BENCHMARKS, attention_bench, load  # noqa: F401 (a fixture)

REPO = BENCHMARKS.parent


@pytest.fixture(scope="module")
def ops_bench():
    return load("ops_bench")


CPU = torch.device("cpu")


# --- the candidate is checked against the baseline before it is timed --------------------------------

def test_attention_error_in_sgdm_is_not_taken_for_an_unavailable_backend(attention_bench, monkeypatch, one_thread):
    """An exception in sgdm's attention was printed as "sdpa: unavailable" and the case silently dropped."""
    def broken(q, k, v):
        raise RuntimeError("sgdm kernel exploded")

    monkeypatch.setattr(attention_bench.ops, "attention", broken)
    with pytest.raises(RuntimeError, match="sgdm kernel exploded"):
        attention_bench.bench_case((1, 2, 64, 32), torch.float32, CPU, 1, torch.Generator().manual_seed(0),
                                   both_kernels=False)


def test_attention_disagreement_is_reported_and_exits_nonzero(attention_bench, monkeypatch, capsys, tmp_path,
                                                              one_thread):
    real = attention_bench.ops.attention
    monkeypatch.setattr(attention_bench.ops, "attention", lambda q, k, v: real(q, k, v) * 1.1)
    with pytest.raises(attention_bench.ops_bench.Disagreement, match=r"attention fwd 1x2x64x32 float32 cpu.*sdpa"):
        attention_bench.bench_case((1, 2, 64, 32), torch.float32, CPU, 1, torch.Generator().manual_seed(0),
                                   both_kernels=False)
    out = tmp_path / "attn.json"
    rc = attention_bench.main(["--device", "cpu", "--threads", "1", "--repeats", "1", "--no-memory",
                               "--seq-len", "64", "--json", str(out)])
    assert rc == 1
    assert "NOT TIMED" in capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["rows"] == [] and len(result["mismatches"]) == 2  # fwd, and fwd+bwd (its gradients)


def test_attention_mma_sync_disagreement_keeps_the_default_rows(attention_bench, monkeypatch, one_thread):
    """On a Hopper GPU the mma.sync kernels are timed beside the default wgmma ones: a disagreement of
    either is reported without losing the other's rows of the same case (here on the CPU, the switch
    faked: the kernels under SGDM_ATTENTION_WGMMA=0 are off by 10%)."""
    real = attention_bench.ops.attention
    monkeypatch.setenv("SGDM_ATTENTION_WGMMA", "")  # unset: the default kernels
    monkeypatch.setattr(attention_bench, "wgmma_runs", lambda device, dtype: True)
    monkeypatch.setattr(attention_bench.ops, "attention", lambda q, k, v: real(q, k, v) * (
        1.1 if os.environ.get("SGDM_ATTENTION_WGMMA") == "0" else 1.0))
    mismatches = []
    rows = attention_bench.bench_case((1, 2, 64, 32), torch.float32, CPU, 1, torch.Generator().manual_seed(0),
                                      both_kernels=True, mismatches=mismatches)
    assert [r["op"] for r in rows] == ["attention fwd", "attention fwd+bwd"]
    assert [m.split(":")[0] for m in mismatches] == ["attention fwd 1x2x64x32 float32 cpu [mma.sync] vs sdpa",
                                                    "attention fwd+bwd 1x2x64x32 float32 cpu [mma.sync] vs sdpa"]
    assert os.environ["SGDM_ATTENTION_WGMMA"] == ""  # the switch is undone after the rows


def test_attention_bench_no_wgmma_runs_the_mma_sync_kernels_everywhere(attention_bench, monkeypatch, capsys):
    """--no-wgmma sets SGDM_ATTENTION_WGMMA=0 for the whole run (gpu_check.sh passes it when the wgmma
    kernels failed their check), so neither the rows nor the smoke run them."""
    monkeypatch.setenv("SGDM_ATTENTION_WGMMA", "")  # undone after the test, also what main() sets
    seen = []
    monkeypatch.setattr(attention_bench, "smoke", lambda device: seen.append(
        os.environ.get("SGDM_ATTENTION_WGMMA")) or 0)
    assert attention_bench.main(["--smoke", "--device", "cpu", "--no-wgmma"]) == 0
    assert seen == ["0"]
    assert not attention_bench.wgmma_runs(torch.device("cuda"), torch.bfloat16)


def test_ops_disagreement_is_reported_per_op_and_exits_nonzero(ops_bench, monkeypatch, capsys, tmp_path,
                                                               one_thread):
    real = ops_bench.ops.group_norm_silu
    monkeypatch.setattr(ops_bench.ops, "group_norm_silu", lambda x, *args: real(x, *args) * 1.05)
    monkeypatch.setattr(ops_bench, "GN_SHAPES", [((2, 8, 4, 4), 2)])
    monkeypatch.setattr(ops_bench, "DDIM_SHAPES", [(2, 4, 4, 4)])
    out = tmp_path / "ops.json"
    rc = ops_bench.main(["--device", "cpu", "--threads", "1", "--repeats", "1", "--allocator", "default",
                         "--json", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "group_norm_silu fwd 2x8x4x4 float32 cpu" in err and "NOT TIMED" in err
    result = json.loads(out.read_text())
    assert [r["op"] for r in result["rows"]] == ["guided_ddim_step"]  # the other op is still timed
    assert [m.split(":")[0] for m in result["mismatches"]] == ["group_norm_silu fwd 2x8x4x4 float32 cpu",
                                                              "group_norm_silu fwd+bwd 2x8x4x4 float32 cpu"]


def test_ops_guided_step_disagreement_is_caught(ops_bench, monkeypatch, one_thread):
    real = ops_bench.ops.guided_ddim_step
    monkeypatch.setattr(ops_bench.ops, "guided_ddim_step",
                        lambda *a, **kw: tuple(t + 0.1 for t in real(*a, **kw)))
    with pytest.raises(ops_bench.Disagreement, match="guided_ddim_step 2x4x4x4"):
        ops_bench.bench_ddim((2, 4, 4, 4), torch.float32, CPU, 1, torch.Generator().manual_seed(0), 1e9)


# --- small modes, bad arguments ------------------------------------------------------------------------

def test_attention_seq_len_gives_a_small_case(attention_bench, tmp_path, one_thread):
    out = tmp_path / "attn.json"
    assert attention_bench.main(["--device", "cpu", "--threads", "1", "--repeats", "1", "--no-memory",
                                 "--seq-len", "64", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["shape"]) for r in rows] == [("attention fwd", "1x16x64x64"),
                                                     ("attention fwd+bwd", "1x16x64x64")]


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "0"], "--seq-len: expected sequence lengths >= 1"),
    (["--threads", "0"], "--threads: expected at least 1"),
])
def test_attention_bad_arguments_name_the_argument(attention_bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        attention_bench.main(["--device", "cpu", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_ops_threads_must_be_positive(ops_bench, capsys):
    with pytest.raises(SystemExit) as exc:
        ops_bench.main(["--device", "cpu", "--allocator", "default", "--threads", "0"])
    assert exc.value.code == 2 and "--threads: expected at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds: expected at least 1"),
    (["--iters", "0"], "--iters: expected at least 1"),
    (["--warmup", "-1"], "--warmup: expected at least 0"),
])
def test_unet_bench_bad_arguments_stop_before_any_worker(monkeypatch, capsys, argv, message):
    unet_bench = load("unet_bench")
    monkeypatch.setattr(unet_bench, "_run_setting", lambda *a: pytest.fail("a worker ran"))
    with pytest.raises(SystemExit) as exc:
        unet_bench.main(["--device", "cpu", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def _fake_unet_worker(eps_off: float = 0.0):
    """A stand-in for unet_bench's worker: times, and the UNet output it saves for the agreement check."""
    calls = []

    def fake(args, setting, check_file=None):
        calls.append(check_file)
        if check_file is not None:
            eps = torch.linspace(-1, 1, 64) + (eps_off if setting else 0.0)
            torch.save(eps, check_file)
        t = 0.1 if setting else 0.2
        return {"train": [t], "sample": [t / 2], "peak_mb": 5.0, "train_peak_mb": 4.0,
                "backend": {"attention": "x"}, "params_m": 1.0}
    return fake, calls


def test_unet_bench_writes_json(monkeypatch, tmp_path, capsys):
    unet_bench = load("unet_bench")
    fake, calls = _fake_unet_worker()
    monkeypatch.setattr(unet_bench, "_run_setting", fake)
    out = tmp_path / "unet.json"
    assert unet_bench.main(["--device", "cpu", "--rounds", "2", "--iters", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"] == "small" and result["compare"] == "kernels"
    assert result["speedup"] == {"train": pytest.approx(2.0), "sample": pytest.approx(2.0)}
    assert result["settings"]["kernels"]["train_ms"] == pytest.approx(100.0)
    assert result["agreement"]["ok"] and result["agreement"]["rel_error"] == 0.0
    assert "speed-up" in capsys.readouterr().out  # the human table as before
    assert [c is not None for c in calls] == [True, True, False, False]  # the first round's workers save eps


def test_unet_bench_reports_settings_that_disagree(monkeypatch, tmp_path, capsys):
    """The kernels (or the compiled UNet) must give the reference's output on the same inputs: a fast
    wrong network is no speed-up. The times are still printed; the exit status is 1."""
    unet_bench = load("unet_bench")
    fake, _ = _fake_unet_worker(eps_off=0.5)
    monkeypatch.setattr(unet_bench, "_run_setting", fake)
    out = tmp_path / "unet.json"
    assert unet_bench.main(["--device", "cpu", "--rounds", "1", "--iters", "1", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "speed-up" in text and "MISMATCH UNet output: kernels vs SGDM_KERNELS=0" in text
    assert not json.loads(out.read_text())["agreement"]["ok"]


def test_train_bench_rounds_must_be_positive(monkeypatch, capsys):
    train_bench = load("train_bench")
    monkeypatch.setattr(train_bench, "_run", lambda *a: pytest.fail("a worker ran"))
    with pytest.raises(SystemExit) as exc:
        train_bench.main(["--configs", "small", "--rounds", "0"])
    assert exc.value.code == 2 and "--rounds: expected at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("n", ["1", "0"])
def test_sampler_bench_needs_two_samples(capsys, n):
    sampler_bench = load("sampler_bench")
    with pytest.raises(SystemExit) as exc:
        sampler_bench.main(["--n", n])
    assert exc.value.code == 2 and "--n: expected at least 2 samples" in capsys.readouterr().err


# --- crf_bench: warm-up, synchronised timing, JSON --------------------------------------------------------

@pytest.fixture(scope="module")
def crf_bench():
    return load("crf_bench")


def test_crf_bench_warms_up_and_writes_json(crf_bench, monkeypatch, tmp_path, capsys, one_thread):
    calls = []
    real = crf_bench.dense_crf
    monkeypatch.setattr(crf_bench, "dense_crf", lambda image, probs, params, block: calls.append(params.method)
                        or real(image, probs, params, block))
    out = tmp_path / "crf.json"
    crf_bench.main(["--sides", "8", "--repeats", "2", "--json", str(out)])
    assert calls == ["exact", "lattice"] * 3  # one untimed call of each, then the two timed rounds
    rows = json.loads(out.read_text())["rows"]
    assert [(r["side"], r["method"]) for r in rows] == [(8, "exact"), (8, "lattice")]
    assert rows[1]["agree_with_exact"] is not None and rows[0]["lattice_over_exact_wall"] == pytest.approx(1.0)


def test_crf_bench_synchronises_inside_the_timed_region(crf_bench, monkeypatch):
    """CUDA work is asynchronous: the clock must stop after the device is done, not before."""
    events = []
    ticks = iter(range(100))
    monkeypatch.setattr(crf_bench.time, "perf_counter", lambda: events.append("clock") or next(ticks))
    crf_bench.timed(lambda: events.append("work"), sync=lambda: events.append("sync"))
    assert events == ["clock", "work", "sync", "clock"]


@pytest.mark.parametrize("script, entry", [("kmeans_bench", "parse_args"), ("crf_bench", "main"),
                                           ("data_bench", "main")])
def test_repeats_must_be_positive(capsys, script, entry):
    with pytest.raises(SystemExit) as exc:
        getattr(load(script), entry)(["--repeats", "0"])
    assert exc.value.code == 2 and "--repeats: expected at least 1" in capsys.readouterr().err


# --- gpu_check.sh, with stub commands ---------------------------------------------------------------

STUB_PY = """\
#!/usr/bin/env bash
# a stand-in python: the summary's own code runs for real; the GPU commands pretend, writing a JSON result
echo "PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-} SGDM_ATTENTION_WGMMA=${SGDM_ATTENTION_WGMMA-unset} $*" >>"$STUB_LOG"
if [ "$1" = - ]; then exec "$REAL_PY" "$@"; fi
if [ "$1" = setup.py ] && [ -n "${STUB_HANG_BUILD:-}" ]; then
  exec "$REAL_PY" -c "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
fi
sleep "${STUB_SLEEP:-0}"
prev=
for a in "$@"; do
  if [ "$prev" = --json ]; then cp "$STUB_JSON/$(basename "$1" .py).json" "$a"; fi
  prev=$a
done
exit 0
"""
STUB_NVCC = """\
#!/usr/bin/env bash
prev=
for a in "$@"; do
  if [ "$prev" = -o ]; then
    case "$a:${STUB_WGMMA_DISAGREES:-}" in
      *attention_wgmma:1) printf '#!/bin/sh\\necho THE WGMMA KERNELS DISAGREE\\nexit 1\\n' >"$a" ;;
      *) printf '#!/bin/sh\\necho stub kernel ok\\n' >"$a" ;;
    esac
    chmod +x "$a"
  fi
  prev=$a
done
"""
STUB_NVIDIA_SMI = """\
#!/usr/bin/env bash
case "$*" in *compute_cap*) echo 9.0 ;; *) echo "GPU 0: Stub H100" ;; esac
"""
STUB_SANITIZER = """\
#!/usr/bin/env bash
shift 4  # --tool NAME --error-exitcode 9
exec "$@"
"""


def _stub_json(dir: pathlib.Path) -> None:
    env = {"torch": "x", "threads": 1, "backend": {}}
    ops_row = {"op": "group_norm_silu fwd", "shape": "2x2", "dtype": "bfloat16", "device": "cuda", "eager_ms": 2.0,
               "sgdm_ms": 1.0, "ratio": 2.0, "sgdm_gbps": 1.0, "floor_pct": 50.0, "target": ">=70%"}
    attn_row = dict(ops_row, op="attention fwd", baseline="sdpa-flash", sgdm_tflops=321.5, baseline_tflops=400.0,
                    floor_pct=None)
    (dir / "ops_bench.json").write_text(json.dumps({"env": env, "rows": [ops_row]}))
    (dir / "attention_bench.json").write_text(json.dumps({"env": env, "rows": [attn_row], "memory": []}))
    (dir / "kmeans_bench.json").write_text(json.dumps({"total_s": 12.5}))
    (dir / "unet_bench.json").write_text(json.dumps({"speedup": {"train": 1.5}}))


def run_gpu_check(tmp_path: pathlib.Path, timeout: float, python: str = "python",
                  **env_extra) -> tuple[subprocess.CompletedProcess, float]:
    """gpu_check.sh with stubs for python (named ``python``, passed as PYTHON; or ``python3``, found on a
    PATH without this venv), nvcc, nvidia-smi and compute-sanitizer."""
    stubs = tmp_path / "stubs"
    (stubs / "cuda" / "bin").mkdir(parents=True)
    for path, text in ((stubs / python, STUB_PY), (stubs / "cuda" / "bin" / "nvcc", STUB_NVCC),
                       (stubs / "nvidia-smi", STUB_NVIDIA_SMI), (stubs / "sanitizer", STUB_SANITIZER)):
        path.write_text(text)
        path.chmod(0o755)
    (stubs / "json").mkdir()
    _stub_json(stubs / "json")
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", PYTHON=str(stubs / python), REAL_PY=sys.executable,
               CUDA_HOME=str(stubs / "cuda"), SANITIZER=str(stubs / "sanitizer"), OUT=str(out),
               STUB_LOG=str(tmp_path / "calls.log"), STUB_JSON=str(stubs / "json"), TMPDIR=str(tmp_path),
               **env_extra)
    if python == "python3":  # no `python` anywhere on the PATH (no venv: /usr/bin has python3 only)
        env.pop("PYTHON")
        env["PATH"] = f"{stubs}:/usr/bin:/bin"
    start = time.monotonic()
    proc = subprocess.Popen(["bash", str(BENCHMARKS / "gpu_check.sh")], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = "", f"gpu_check.sh still running after {timeout} s"
    finally:  # end what this run started (timeout(1) gives each step a process group of its own)
        for pid in _session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), time.monotonic() - start


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _steps(tmp_path) -> dict[str, str]:
    lines = (tmp_path / "out" / "steps.tsv").read_text().splitlines()
    return {line.split("\t")[0]: line.split("\t")[1] for line in lines}


def test_gpu_check_syntax():
    subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")], check=True)


def test_gpu_check_all_steps_and_a_machine_readable_summary(tmp_path):
    proc, _ = run_gpu_check(tmp_path, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = _steps(tmp_path)
    assert list(steps) == ["env", "build", "info", "attention-wgmma", "cuda-tests", "bench-1", "bench-2", "bench-3",
                           "attention-tiles", "memcheck-1", "racecheck-1", "memcheck-2", "racecheck-2",
                           "kmeans-paper", "unet-churches", "unet-compile"]
    assert set(steps.values()) == {"ok"}
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert len(summary["benchmarks"]) == 3
    # the end-to-end runs are in the JSON too, not only in their text files
    assert summary["results"] == {"kmeans_paper": {"total_s": 12.5}, "unet_churches": {"speedup": {"train": 1.5}},
                                  "unet_compile": {"speedup": {"train": 1.5}}}
    # the standalone CUDA programs' output too (the wgmma kernels' first verdict)
    assert summary["programs"] == {"attention_tiles": "stub kernel ok\n", "attention_wgmma": "stub kernel ok\n"}
    assert "attention_wgmma:\nstub kernel ok" in proc.stdout
    # and their headline numbers are printed (the lent machine returns only the output's tail)
    assert 'unet_churches: {"speedup": {"train": 1.5}}' in proc.stdout
    assert 'kmeans_paper: {"total_s": 12.5}' in proc.stdout
    # the attention rows are printed with their own table: TFLOP/s and the SDPA backend
    assert "sgdm TF/s" in proc.stdout and "321.500" in proc.stdout and "sdpa-flash" in proc.stdout
    # the wgmma kernels passed their standalone check, so the tests and benchmarks run them (the default)
    calls = (tmp_path / "calls.log").read_text()
    assert "not wgmma" not in calls and "--no-wgmma" not in calls
    # the tests run in a pytest-xdist worker (the stand-in python imports anything): a crash fails one test
    assert any(" -m pytest -q -n 1 -m cuda " in line for line in calls.splitlines()), calls
    # a step cut short still leaves its rows in the log
    assert all(line.startswith("PYTHONUNBUFFERED=1 SGDM_ATTENTION_WGMMA=unset ") for line in calls.splitlines())
    # the lent machine returns at most 8 files from $OUT: the intermediates stay elsewhere
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_check.json", "gpu_check.log", "steps.tsv"]


def test_gpu_check_runs_the_mma_sync_kernels_when_the_wgmma_kernels_fail_their_check(tmp_path):
    """The wgmma kernels are the default on a 9.0 GPU: when their standalone check fails, every later
    step runs with SGDM_ATTENTION_WGMMA=0, the tests leave out the wgmma ones and the attention
    benchmarks get --no-wgmma; the run's status says the check failed."""
    proc, _ = run_gpu_check(tmp_path, timeout=150, STUB_WGMMA_DISAGREES="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    steps = _steps(tmp_path)
    assert steps["attention-wgmma"] == "fail(1)" and steps["cuda-tests"] == "ok"
    assert "THE WGMMA KERNELS DISAGREE" in (tmp_path / "out" / "gpu_check.log").read_text()
    calls = [line for line in (tmp_path / "calls.log").read_text().splitlines() if " setup.py " not in line]
    later = calls[[i for i, line in enumerate(calls) if "sgdm.cli.main info" in line][0] + 1:]
    assert later and all("SGDM_ATTENTION_WGMMA=0 " in line for line in later)
    assert any("pytest" in line and "not wgmma" in line for line in later)
    assert all("--no-wgmma" in line for line in later if "attention_bench.py" in line)


def test_gpu_check_finds_python3(tmp_path):
    """The lent machine's torch is under `python3`; a plain `python` may not exist there."""
    proc, _ = run_gpu_check(tmp_path, timeout=150, python="python3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(_steps(tmp_path).values()) == {"ok"}


def test_gpu_check_keeps_to_its_budget_and_still_writes_the_summary(tmp_path):
    """The lent machine stops the command at 10 minutes: the steps (limits summing to ~35 minutes) are cut
    to GPU_CHECK_BUDGET_S so that the summary and the JSON are always written."""
    proc, seconds = run_gpu_check(tmp_path, timeout=90, GPU_CHECK_BUDGET_S="46", STUB_SLEEP="3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert seconds < 60
    steps = _steps(tmp_path)
    assert steps["env"] == "ok" and "skipped" in steps.values()
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]
    assert "skipped" in proc.stdout


def test_gpu_check_kills_a_step_that_ignores_sigterm(tmp_path):
    """A step whose process ignores SIGTERM (a hung kernel) is killed, not waited for without end."""
    proc, seconds = run_gpu_check(tmp_path, timeout=90, GPU_CHECK_BUDGET_S="50", STUB_HANG_BUILD="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _steps(tmp_path)["build"] == "timeout"
    assert (tmp_path / "out" / "gpu_check.json").exists()


def test_gpu_check_rejects_a_bad_budget(tmp_path):
    proc, _ = run_gpu_check(tmp_path, timeout=30, GPU_CHECK_BUDGET_S="9m")
    assert proc.returncode == 2 and "GPU_CHECK_BUDGET_S=9m" in proc.stderr


def test_unet_bench_workers_build_the_same_network(tmp_path, one_thread):
    """Both settings must time (and check) the same weights: the UNet's initialisation is seeded, not
    drawn from whatever the process's global RNG holds."""
    import types

    unet_bench = load("unet_bench")
    outputs = []
    for i in range(2):
        args = types.SimpleNamespace(config="small", device="cpu", batch=1, iters=1, warmup=0, precision="fp32",
                                     threads=1, clock="wall", compiled=False, check_file=str(tmp_path / f"{i}.pt"))
        torch.rand(i + 1)  # the global RNG is elsewhere the second time
        unet_bench.worker(args)
        outputs.append(torch.load(args.check_file))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_ops_backward_disagreement_keeps_the_forward_row(ops_bench, monkeypatch, one_thread):
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.1

    real = ops_bench.ops.group_norm_silu
    monkeypatch.setattr(ops_bench.ops, "group_norm_silu", lambda x, *args: WrongGrad.apply(real(x, *args)))
    monkeypatch.setattr(ops_bench, "GN_SHAPES", [((2, 8, 4, 4), 2)])
    monkeypatch.setattr(ops_bench, "DDIM_SHAPES", [])
    result = ops_bench.run(["cpu"], [torch.float32], 1, repeats=1)
    assert [r["op"] for r in result["rows"]] == ["group_norm_silu fwd"]
    assert [m.split(":")[0] for m in result["mismatches"]] == ["group_norm_silu fwd+bwd 2x8x4x4 float32 cpu"]
