"""benchmarks/*.py: argument checks and reporting paths that need no real timing (seconds, CPU)."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does: dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kmeans_bench():
    return load("kmeans_bench")


def test_kmeans_without_faiss_says_so_and_runs_the_rest(kmeans_bench, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    args = kmeans_bench.parse_args(["--n", "300", "--dim", "4", "--k", "3", "--repeats", "1",
                                    "--methods", "sgdm,faiss"])
    summary = kmeans_bench.compare(args)
    assert list(summary["methods"]) == ["sgdm"]
    assert "faiss is not installed" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--methods faiss: faiss is not installed"):
        kmeans_bench.compare(kmeans_bench.parse_args(["--n", "300", "--k", "3", "--methods", "faiss"]))


def test_kmeans_unknown_method_is_an_error(kmeans_bench):
    with pytest.raises(SystemExit, match=r"--methods: unknown \['sklean'\]"):
        kmeans_bench.compare(kmeans_bench.parse_args(["--n", "300", "--k", "3", "--methods", "sgdm,sklean"]))


def test_kmeans_warms_every_method_up_before_timing(kmeans_bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    calls = []
    real = kmeans_bench.run_sgdm
    monkeypatch.setattr(kmeans_bench, "run_sgdm", lambda x, k, *a, **kw: calls.append(len(x)) or real(x, k, *a, **kw))
    kmeans_bench.compare(kmeans_bench.parse_args(["--n", "2000", "--dim", "4", "--k", "3", "--repeats", "1",
                                                  "--methods", "sgdm"]))
    assert calls == [3 * 64, 2000]  # an untimed run on a slice, then the timed one


@pytest.fixture(scope="module")
def paper_tables():
    return load("paper_tables")


def test_paper_tables_only_names_known_variants(paper_tables):
    assert paper_tables.only_variants(paper_tables.parse_args([])) is None
    assert paper_tables.only_variants(paper_tables.parse_args(["--only", "no-guidance, self-label"])) == \
        {"no-guidance", "self-label"}
    with pytest.raises(SystemExit, match=r"--only: unknown variant\(s\) \['self-labels'\] \(choose from no-guidance,"):
        paper_tables.only_variants(paper_tables.parse_args(["--only", "no-guidance,self-labels"]))
    with pytest.raises(SystemExit, match="--only: unknown"):
        paper_tables.only_variants(paper_tables.parse_args(["--only", ","]))


def test_paper_tables_checks_only_before_preparing(paper_tables, monkeypatch):
    import sgdm.quickstart

    monkeypatch.setattr(sgdm.quickstart, "prepare", lambda *a, **k: pytest.fail("prepared before checking --only"))
    with pytest.raises(SystemExit, match="--only: unknown"):
        paper_tables.main(["--only", "self-labels"])


@pytest.fixture(scope="module")
def attention_bench():
    sys.path.insert(0, str(BENCHMARKS))  # it imports ops_bench as a sibling, as when run as a script
    try:
        return load("attention_bench")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_attention_flops_and_a_tiny_cpu_case(attention_bench):
    import torch

    assert attention_bench.flops(2, 3, 5, 7, backward=False) == 4 * 2 * 3 * 5 * 5 * 7
    assert attention_bench.flops(2, 3, 5, 7, backward=True) == 3.5 * 4 * 2 * 3 * 5 * 5 * 7  # fwd + 2.5x fwd
    rows = attention_bench.bench_case((1, 2, 64, 32), torch.float32, torch.device("cpu"), 1,
                                      torch.Generator().manual_seed(0), both_kernels=False)
    assert [r["op"] for r in rows] == ["attention fwd", "attention fwd+bwd"]
    assert all(r["ratio"] > 0 and r["baseline"] == "sdpa" for r in rows)


def test_attention_repeats_must_be_positive(attention_bench, capsys):
    with pytest.raises(SystemExit):
        attention_bench.main(["--device", "cpu", "--repeats", "0"])
    assert "--repeats: expected at least 1" in capsys.readouterr().err


def test_train_bench_alternates_settings_abba(monkeypatch, capsys):
    train_bench = load("train_bench")
    order = []

    def fake_run(config, kernels, args):
        order.append(kernels)
        return {"config": config, "kernels": kernels, "compile": False, "device": "cpu", "batch_size": 4,
                "steps_per_s": 2.0 if kernels else 1.0, "images_per_s": 8.0, "peak_memory_mb": 1.0,
                "tree": "/src/sgdm"}

    monkeypatch.setattr(train_bench, "_run", fake_run)
    assert train_bench.main(["--configs", "small", "--rounds", "4", "--steps", "8", "--warmup", "1"]) == 0
    assert order == [True, False, False, True, True, False, False, True]
    assert "2.000" in capsys.readouterr().out  # the kernel / reference ratio of the same run


@pytest.mark.parametrize("compare", ["kernels", "compile"])
def test_train_bench_workers_get_the_compared_setting(monkeypatch, compare):
    """--compare compile: both runs keep the kernels and only one compiles; --compare kernels: no compile."""
    import json
    import subprocess
    import types

    train_bench = load("train_bench")
    calls = []

    def fake_subprocess_run(cmd, env, **kwargs):
        calls.append((cmd, env["SGDM_KERNELS"]))
        result = {"steps_per_s": 1.0}
        return types.SimpleNamespace(returncode=0, stdout="RESULT " + json.dumps(result), stderr="")

    monkeypatch.setattr(subprocess, "run", fake_subprocess_run)
    args = types.SimpleNamespace(compare=compare, steps=8, warmup=1, churches_batch=4, clock="wall", cache_latents=False,
                                 baseline_tree=None)
    for setting in (True, False):
        train_bench._run("small", setting, args)
    (on_cmd, on_kernels), (off_cmd, off_kernels) = calls
    assert ("--compiled" in on_cmd, "--compiled" in off_cmd) == ((True, False) if compare == "compile" else (False, False))
    assert (on_kernels, off_kernels) == (("1", "1") if compare == "compile" else ("1", "0"))


def test_train_bench_worker_reports_the_backends_of_its_device(monkeypatch, capsys, tmp_path):
    """A GPU run's result names the ops' CUDA backends, not the CPU's (here with the GPU calls stubbed)."""
    import json
    import types

    import torch

    import sgdm.config.schema
    import sgdm.training.data
    import sgdm.training.run
    from sgdm import ops

    train_bench = load("train_bench")
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(accelerator="gpu", batch_size=2), data=None)
    monkeypatch.setattr(sgdm.config.schema, "load_experiment", lambda path, overrides: cfg)
    monkeypatch.setattr(sgdm.training.data, "build_image_dataset", lambda data, seed: [{"id": "a"}])
    monkeypatch.setattr(train_bench, "_label_store", lambda cfg, ids: None)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)

    def fake_train(cfg, callbacks):
        for _ in range(3):
            callbacks[0].on_train_batch_end()
        return 0

    monkeypatch.setattr(sgdm.training.run, "train", fake_train)
    train_bench.worker(types.SimpleNamespace(config="small", steps=3, warmup=0, run_dir=str(tmp_path),
                                             churches_batch=2, compiled=False, cache_latents=False, clock="wall"))
    line = next(li for li in capsys.readouterr().out.splitlines() if li.startswith("RESULT "))
    assert json.loads(line[len("RESULT "):])["backends"] == ops.backend("cuda")


def test_ops_bench_cpu_targets_are_fp32s():
    import torch

    ops_bench = load("ops_bench")
    cpu = torch.device("cpu")
    assert ops_bench._row("guided_ddim_step", (2, 4), torch.float32, cpu, 2.0, 1.0, 8, 1e9, ">=4x cpu").target == ">=4x cpu"
    row = ops_bench._row("guided_ddim_step", (2, 4), torch.bfloat16, cpu, 2.0, 1.0, 8, 1e9, ">=4x cpu")
    assert row.target == "" and row.ratio == 2.0 and row.floor_pct is None


@pytest.mark.parametrize("compare", ["kernels", "compile"])
def test_unet_bench_workers_get_the_compared_setting(monkeypatch, compare):
    import subprocess
    import types

    unet_bench = load("unet_bench")
    calls = []

    def fake_subprocess_run(cmd, env, **kwargs):
        calls.append((cmd, env["SGDM_KERNELS"]))
        return types.SimpleNamespace(returncode=0, stdout='{"train": [1.0]}\n', stderr="")

    monkeypatch.setattr(subprocess, "run", fake_subprocess_run)
    args = types.SimpleNamespace(compare=compare, config="small", device="cpu", batch=2, iters=1, warmup=0,
                                 precision="fp32", threads=1, clock="wall")
    for setting in (True, False):
        assert unet_bench._run_setting(args, setting) == {"train": [1.0]}
    (on_cmd, on_kernels), (off_cmd, off_kernels) = calls
    assert ("--compiled" in on_cmd, "--compiled" in off_cmd) == ((True, False) if compare == "compile" else (False, False))
    assert (on_kernels, off_kernels) == (("1", "1") if compare == "compile" else ("1", "0"))


def test_smokes_check_the_ops_and_report_a_mismatch(attention_bench, monkeypatch, capsys):
    # what gpu_check.sh runs under compute-sanitizer, here on the CPU: 0 on agreement, 1 on a mismatch
    import torch

    from sgdm import ops

    ops_bench = load("ops_bench")
    cpu = torch.device("cpu")
    assert ops_bench.smoke(cpu) == 0 and attention_bench.smoke(cpu) == 0
    assert "smoke on cpu: backends" in capsys.readouterr().out
    real = ops.group_norm_silu
    monkeypatch.setattr(ops, "group_norm_silu", lambda x, *args: real(x, *args) * 1.05)
    assert ops_bench.smoke(cpu) == 1 and attention_bench.smoke(cpu) == 0
    assert capsys.readouterr().out.splitlines()[-2].endswith(", 10 mismatches")  # 5 GroupNorm cases x 2 dtypes


def test_train_bench_compare_tree_runs_the_baseline_checkout(monkeypatch, tmp_path):
    """--compare tree: both runs keep the kernels; the baseline's worker imports sgdm from --baseline-tree."""
    import json
    import subprocess
    import types

    train_bench = load("train_bench")
    calls = []

    def fake_subprocess_run(cmd, env, **kwargs):
        calls.append((env["PYTHONPATH"], env["SGDM_KERNELS"], cmd))
        return types.SimpleNamespace(returncode=0, stdout="RESULT " + json.dumps({"steps_per_s": 1.0}), stderr="")

    monkeypatch.setattr(subprocess, "run", fake_subprocess_run)
    args = types.SimpleNamespace(compare="tree", steps=8, warmup=1, churches_batch=4, clock="cpu", cache_latents=True,
                                 baseline_tree=tmp_path)
    for setting in (True, False):
        train_bench._run("small", setting, args)
    (this, on_kernels, on_cmd), (baseline, off_kernels, off_cmd) = calls
    assert (this, baseline) == (str(train_bench.ROOT), str(tmp_path))
    assert (on_kernels, off_kernels) == ("1", "1")
    assert all("--cache-latents" in c and c[c.index("--clock") + 1] == "cpu" for c in (on_cmd, off_cmd))
    with pytest.raises(SystemExit):
        train_bench.main(["--compare", "tree"])  # no --baseline-tree
