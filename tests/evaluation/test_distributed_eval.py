"""`sgdm-ldm eval` shared between the processes of a torchrun or srun launch (2 CPU processes, gloo)
gives the results of one process; the pieces (shares, the hand-over files, errors before sampling)
in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sgdm.cli.main import main
from sgdm.config.core import ConfigError
from sgdm.evaluation import evaluate, ranks
from tests.evaluation.conftest import save_random_inception
from tests.evaluation.helpers import make_run
from tests.launchers import TORCHRUN, free_port, srun_tasks

ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1"}
# every metric (Inception ones with random weights), and a sweep, so that each row is compared;
# --num-samples: torchrun takes --n for an abbreviation of its own --nnodes / --nproc-per-node
ARGS = ["--num-samples", "6", "--sweep-scale", "1,3", "--metrics", "fid,is,kid,fd,adherence"]


def _varied_box_run(tmp_path):
    """A box run whose samples depend on the noise, the scale and the condition (a fresh UNet's zero
    output layers make every scale and box sample the same images) and whose boxes differ per image."""
    from sgdm.annotation.store import write_store
    from sgdm.data import build_dataset
    from sgdm.evaluation.evaluate import load_run
    from sgdm.pipeline import SelfGuidedPipeline

    run_dir = make_run(tmp_path, "box")
    cfg, pipe = load_run(run_dir, "cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    pipe.save_pretrained(run_dir / "pipeline")
    assert isinstance(SelfGuidedPipeline.from_pretrained(run_dir / "pipeline"), SelfGuidedPipeline)
    ids = build_dataset(cfg.data, train=False).ids
    lo = torch.rand(len(ids), 2, generator=g) * 0.5
    boxes = torch.cat([lo, lo + 0.2 + torch.rand(len(ids), 2, generator=g) * 0.3], 1)
    write_store(cfg.annotation.store, ids, {"cluster": torch.arange(len(ids)) % 3, "box": boxes}, granularity="box",
                num_classes=3)
    return run_dir


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The run, its Inception file, and the results.json of one process (one thread, as each launched
    process has), read before any launch overwrites it."""
    tmp_path = tmp_path_factory.mktemp("disteval")
    run_dir = _varied_box_run(tmp_path)
    weights = save_random_inception(tmp_path / "inception.pth")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["eval", str(run_dir), "--inception-weights", str(weights), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    assert not (run_dir / "eval" / ".rank-samples").exists()  # one process hands nothing over
    return run_dir, weights, json.loads((run_dir / "eval" / "results.json").read_text())


def _assert_rows_match(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert set(a) <= set(b), set(a) - set(b)
        for key, value in a.items():
            # the same images in the same batches: only the processes' float order may differ
            assert value == (pytest.approx(b[key], rel=1e-4, abs=1e-6) if isinstance(value, float) else b[key]), key


def _command(run_dir, *args) -> list[str]:
    return [sys.executable, "-m", "sgdm.cli.main", "eval", str(run_dir), *args]


def test_scales_differ_so_a_wrong_share_would_show(single):
    _, _, results = single
    a, b = results["results"]
    assert a["fd_tiny"] != pytest.approx(b["fd_tiny"], rel=1e-3)


def test_torchrun_two_processes_give_the_results_of_one(single):
    run_dir, weights, want = single
    # what a crashed evaluation left: a stale share and a stale failure; rank 0 clears both before sampling
    leftovers = run_dir / "eval" / ".rank-samples"
    leftovers.mkdir(parents=True)
    torch.save(torch.zeros(3, 3, 16, 16), leftovers / "w000-rank00001.pt")
    (leftovers / "rank00001.failed").write_text("RuntimeError: an earlier crash")
    command = [*TORCHRUN, *_command(run_dir, "--inception-weights", str(weights), *ARGS)[1:]]
    proc = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    got = json.loads((run_dir / "eval" / "results.json").read_text())
    _assert_rows_match(got["results"], want["results"])
    assert {k: v for k, v in got.items() if k != "results"} == {k: v for k, v in want.items() if k != "results"}
    assert not leftovers.exists()
    assert output.count("eval: w=") == 2  # one line per scale: rank 0's
    assert output.count("| guidance_scale |") == 1  # the table printed once


def test_srun_tasks_give_the_results_of_one_process(single):
    """Two tasks as srun starts them (the variables it sets); one scale of the sweep on its own equals
    its row of the sweep."""
    run_dir, _, want = single
    procs = srun_tasks(_command(run_dir, "--guidance-scale", "3", "--metrics", "fd,adherence"), ENV, "eval.sh")
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    got = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    _assert_rows_match(got, want["results"][1:])
    assert "eval: w=3.0" in outputs[0] and "eval: w=" not in outputs[1]
    assert not (run_dir / "eval" / ".rank-samples").exists()


@pytest.mark.parametrize("n,batch_size,world", [(6, 3, 2), (10, 3, 2), (10, 3, 3), (10, 3, 8), (100, 7, 8), (5, 5, 2)])
def test_shares_are_contiguous_whole_batches_covering_every_image_once(n, batch_size, world):
    bounds = [ranks.share(n, batch_size, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(lo % batch_size == 0 and (hi % batch_size == 0 or hi == n) for lo, hi in bounds)
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= batch_size  # balanced to a batch


def test_shares_sampled_apart_are_the_images_of_one_generation(tmp_path):
    from sgdm.evaluation.conditions import draw_conditions
    from sgdm.pipeline import per_image_generators

    run_dir = _varied_box_run(tmp_path)
    cfg, pipe = evaluate.load_run(run_dir, "cpu")
    e = cfg.eval
    conditions = draw_conditions("box", cfg.annotation.store, e.n, torch.Generator().manual_seed(e.seed))
    whole = evaluate.generate(pipe, conditions, 2.0, e, e.n)
    parts = []
    for rank in range(2):
        lo, hi = ranks.share(e.n, e.batch_size, rank, 2)
        generators = per_image_generators(torch.Generator().manual_seed(e.seed), e.n)[lo:hi]
        parts.append(evaluate.generate(pipe, conditions.slice(lo, hi), 2.0, e, hi - lo, generators))
    assert torch.equal(torch.cat(parts), whole)
    # and the shares are not all alike: a rank that sampled another's images would be seen
    assert not torch.allclose(parts[0], parts[1])


def test_rank_zero_gathers_the_files_in_rank_order_and_deletes_them(tmp_path):
    images = torch.randn(7, 3, 4, 4)
    bounds = [(0, 3), (3, 3), (3, 6), (6, 7)]  # rank 1 samples nothing
    for rank in (2, 3):
        ranks.Shares(tmp_path, rank, 4).put(0, images[slice(*bounds[rank])])
    got = ranks.Shares(tmp_path, 0, 4).gather(0, images[:3], bounds, print)
    assert torch.equal(got, images) and not list(tmp_path.iterdir())


def test_a_failed_rank_stops_rank_zero_instead_of_leaving_it_waiting(tmp_path):
    images = torch.randn(6, 3, 4, 4)
    ranks.Shares(tmp_path, 1, 3).put(0, images[2:4])
    try:
        raise torch.OutOfMemoryError("CUDA out of memory")
    except RuntimeError as err:
        ranks.Shares(tmp_path, 2, 3).fail(err)
    with pytest.raises(RuntimeError, match="rank 2 of 3 stopped: OutOfMemoryError: CUDA out of memory"):
        ranks.Shares(tmp_path, 0, 3).gather(0, images[:2], [(0, 2), (2, 4), (4, 6)], print)


def test_an_error_on_one_rank_before_sampling_stops_every_rank(tmp_path):
    """Rank 1 alone fails while preparing: both processes leave the collective with an error naming it."""
    script = textwrap.dedent("""
        import sys
        from sgdm.launch import process_group
        from sgdm.evaluation.ranks import agree
        import torch.distributed as dist

        def prepare():
            if dist.get_rank() == 1:
                raise FileNotFoundError("no such weights on this node")
            return (1,)
        code = 0
        with process_group() as joined:
            assert joined
            rank = dist.get_rank()
            try:
                agree(2, prepare)
            except Exception as err:
                print(f"rank {rank}: {type(err).__name__}: {err}")
                code = 1
        assert not dist.is_initialized()  # left on the way out
        sys.exit(code)
    """)
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outputs
    assert "rank 0: RuntimeError: rank 1 of 2 stopped before sampling: FileNotFoundError: no such weights" in outputs[0]
    assert "rank 1: FileNotFoundError: no such weights on this node" in outputs[1]


def test_each_process_gets_its_own_gpu(monkeypatch):
    import sgdm.devices

    monkeypatch.setattr(sgdm.devices, "resolve_device", lambda value, key: torch.device(value))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ranks.process_device("cuda", 2) == torch.device("cuda", 1)
    assert ranks.process_device("cuda", 1) == torch.device("cuda")  # alone: as today
    assert ranks.process_device("cpu", 2) == torch.device("cpu")
    with pytest.raises(ConfigError, match="eval.device.*puts the 2 processes of this machine on one GPU"):
        ranks.process_device("cuda:0", 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1: each sees one
    assert ranks.process_device("cuda:0", 2) == torch.device("cuda", 0)
