"""The processes of a run train on the images rank 0 sees: each rank stats the files itself (a network file
system still being copied to, node-local copies that differ), and when one sees others, every rank stops with
the same error naming that rank and its first differing files, instead of one refusing while the others wait
for it, or all training on different images (gloo on the CPU)."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
from datetime import timedelta

import pytest

from tests.launchers import leave_process, srun_tasks
from tests.training.helpers import cli_command, write_config
from tests.training.test_resume_dataset_changes import _replace
from tests.training.test_resume_moved_paths import _folder_config, _images

WAIT = 120  # s: a rank still running after this waits for another that will never come
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1"}


def _rank(rank: int, roots: list, rendezvous: str, out: str) -> None:
    """One rank: for each case, its copy of the images ``roots[case][rank]``; what agreement said, in
    ``out/case-rank``."""
    import torch.distributed as dist

    from sgdm.config.core import ConfigError
    from sgdm.data import build_dataset
    from sgdm.training.dataset_record import agree_across_ranks
    from tests.data.test_datasets import cfg

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=len(roots[0]),
                            timeout=timedelta(seconds=WAIT))
    try:
        for case, copies in enumerate(roots):
            root = copies[rank]
            try:
                agree_across_ranks(build_dataset(cfg(dataset="image_folder", root=root), train=False), root)
                said = "agreed"
            except ConfigError as err:
                said = str(err) if err.key == "data.root" else f"another key: {err}"
            with open(os.path.join(out, f"{case}-{rank}"), "w") as fh:
                fh.write(said)
    finally:
        dist.destroy_process_group()
    leave_process()


@pytest.fixture(scope="module")
def agreement(tmp_path_factory) -> tuple:
    """Two ranks, three cases: copies of the same images at two paths; rank 1's copy with img_3.png replaced
    by a picture of another file size; rank 1's without img_1.png and with one more. Each case's
    (roots, what each rank said)."""
    tmp = tmp_path_factory.mktemp("ranks")
    same = [_images(tmp / "same-0"), tmp / "same-1"]
    shutil.copytree(same[0], same[1])
    replaced = [shutil.copytree(same[0], tmp / f"replaced-{r}") for r in range(2)]
    _replace(replaced[1] / "img_3.png")
    added = [shutil.copytree(same[0], tmp / f"added-{r}") for r in range(2)]
    (added[1] / "img_1.png").unlink()
    shutil.copy(added[1] / "img_0.png", added[1] / "img_9.png")
    roots = [[str(p) for p in case] for case in (same, replaced, added)]
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_rank, args=(r, roots, str(tmp / "rendezvous"), str(tmp))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(WAIT)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} still waiting after {WAIT} s"
    assert [p.exitcode for p in procs] == [0, 0]
    return [(case, [(tmp / f"{c}-{r}").read_text() for r in range(2)]) for c, case in enumerate(roots)]


def test_ranks_with_copies_of_the_same_images_at_other_paths_agree(agreement):
    roots, said = agreement[0]
    assert said == ["agreed", "agreed"]


def test_a_file_of_another_size_on_one_rank_stops_every_rank_naming_it(agreement):
    roots, said = agreement[1]
    assert said[0] == said[1]  # one error, on every rank
    assert said[0].startswith("data.root: the 2 processes of this run do not see the same images under "
                              f"{roots[0]}: rank 1 ({roots[1]}) against rank 0: 1 replaced (another file size: "
                              "img_3.png)."), said[0]


def test_images_added_and_removed_on_one_rank_stop_every_rank_naming_them(agreement):
    roots, said = agreement[2]
    assert said[0] == said[1]
    assert f"rank 1 ({roots[1]}) against rank 0: 1 added (img_9.png), 1 removed (img_1.png)" in said[0], said[0]


def test_one_process_compares_with_no_one(tmp_path):
    from sgdm.data import build_dataset
    from sgdm.training.dataset_record import agree_across_ranks
    from tests.data.test_datasets import cfg

    root = _images(tmp_path / "data")
    agree_across_ranks(build_dataset(cfg(dataset="image_folder", root=root), train=False), root)  # no group


# a command of sgdm-ldm whose process is told by the variable argv[1] = "1" to see img_3.png at another size
DRIVER = """
import os, sys
import sgdm.data.files as files
if os.environ.get(sys.argv[1]) == "1":
    size = files._size
    files._size = lambda path: size(path) + 5 if path.endswith("img_3.png") else size(path)
from sgdm.cli.main import main
sys.exit(main(sys.argv[2:]))
"""
TRAIN = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 2, "devices": 2, "strategy": "ddp"}


def _command(tmp_path, rank_variable: str, *args: str) -> tuple[list[str], dict]:
    root = tmp_path / "data"
    if not root.exists():
        _images(root)
    cfg = _folder_config(tmp_path, root, train=TRAIN)
    driver = tmp_path / "one_rank_sees_another_size.py"
    driver.write_text(DRIVER)
    return [sys.executable, str(driver), rank_variable, *cli_command(write_config(tmp_path, cfg))[3:], *args], cfg


def _said(cfg: dict) -> str:
    """What each process prints when rank 1 sees img_3.png at another size."""
    return (f"sgdm-ldm train: config error: data.root: the 2 processes of this run do not see the same images under "
            f"{cfg['data']['root']}: rank 1 against rank 0: 1 replaced (another file size: img_3.png)")


def _files(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("resume", [False, True])
def test_srun_tasks_that_see_other_images_both_stop_with_the_error_before_anything_is_written(tmp_path, resume):
    """srun starts both tasks; task 1 sees img_3.png at another size. Before: a fresh start trained each task
    on its own images; a resume was refused by task 1 alone while task 0 went on (with a real checkpoint, to
    wait for task 1 at the process group until its timeout)."""
    from tests.training.test_resume_moved_paths import _started

    command, cfg = _command(tmp_path, "SLURM_PROCID", *(["--resume"] if resume else []))
    run_dir = tmp_path / "runs" / cfg["run"]["name"]
    if resume:
        _started(cfg)
    before = _files(run_dir)
    procs = srun_tasks(command, ENV, "train.sh")
    try:
        outputs = [p.communicate(timeout=WAIT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], outputs
    for output in outputs:
        assert _said(cfg) in output, output[-3000:]
    assert _files(run_dir) == before  # nothing written (a fresh start: no run directory)


def test_processes_lightning_starts_compare_their_images_when_their_group_forms(tmp_path):
    """train.devices=2 without a launcher: the second process starts in Trainer.fit, after the first recorded
    the run; it sees img_3.png at another size. Before: both trained, each on its own images."""
    command, cfg = _command(tmp_path, "LOCAL_RANK")
    proc = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=WAIT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert output.count(_said(cfg)) == 2, output[-3000:]  # each process says it
    checkpoints = tmp_path / "runs" / cfg["run"]["name"] / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
