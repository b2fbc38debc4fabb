"""Distributed eval details: ``eval.device: auto`` (the default) on a node of several GPUs,
and the hand-over files of two evaluations of one run at the same time, or of a crashed one."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from sgdm.config.core import ConfigError
from sgdm.evaluation import ranks

TWO_PER_NODE = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_auto_is_each_processes_own_gpu_on_a_node_of_several(monkeypatch):
    """``auto`` resolves to the local GPU's index itself; it was then refused as a ``cuda:N`` that every
    process of the node would share."""
    for key, value in TWO_PER_NODE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ranks.process_device("auto", 2) == torch.device("cuda", 1)
    assert ranks.process_device("cuda", 2) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="eval.device.*'cuda:0' puts the 2 processes of this machine on one GPU"):
        ranks.process_device("cuda:0", 2)


CONCURRENT = textwrap.dedent("""
    import pathlib, sys, torch, torch.distributed as dist
    from sgdm.evaluation.ranks import Shares
    from sgdm.launch import process_group

    folder = pathlib.Path(sys.argv[1])
    with process_group():
        rank = dist.get_rank()
        a = Shares(folder, rank, 2)  # job A (one seed) and job B (another) of one run, at once
        b = Shares(folder, rank, 2)
        def step(shares, do):
            if shares.rank == do:
                yield
            dist.barrier()
        bounds = [(0, 2), (2, 4)]
        for _ in step(a, 0): a.clear()
        for _ in step(a, 1): a.put(0, torch.full((2, 3, 4, 4), 1.0))
        for _ in step(b, 0): b.clear()  # B starts while A runs
        for _ in step(b, 1): b.put(0, torch.full((2, 3, 4, 4), 2.0))
        for _ in step(a, 0):
            print("A read", a.gather(0, torch.zeros(2, 3, 4, 4), bounds, print)[2:].unique().tolist(), flush=True)
        for _ in step(b, 0):
            print("B read", b.gather(0, torch.zeros(2, 3, 4, 4), bounds, print)[2:].unique().tolist(), flush=True)
""")


def test_two_evaluations_at_once_in_one_process_group_read_their_own_samples(tmp_path):
    """Two evaluations of one run at the same time (two jobs; here two in one group of 2 gloo processes,
    in the order two jobs can take): B's start deleted A's samples, and A's rank 0 measured B's."""
    from tests.launchers import free_port

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1",
           "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = [sys.executable, "-c", CONCURRENT, str(tmp_path / ".rank-samples")]
    procs = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=60)[0])
        except subprocess.TimeoutExpired:  # B's rank 0 waiting for samples that A's took
            p.kill()
            outputs.append(p.communicate()[0])
    assert "A read [1.0]" in outputs[0], outputs[0]  # A's own samples, not B's [2.0]
    assert "B read [2.0]" in outputs[0], outputs[0]
    assert [p.returncode for p in procs] == [0, 0], outputs


def _images(value: float) -> torch.Tensor:
    return torch.full((2, 3, 4, 4), value)


def test_two_evaluations_of_one_run_at_once_keep_their_samples_apart(tmp_path):
    """Job A samples with one seed, job B with another, into the same RUN/eval: B's start removes none of
    A's files, and A's rank 0 reads only A's samples (with the files of one folder, it read B's)."""
    folder = tmp_path / ".rank-samples"
    a0, a1 = ranks.Shares(folder, 0, 2, session="a"), ranks.Shares(folder, 1, 2, session="a")
    b0, b1 = ranks.Shares(folder, 0, 2, session="b"), ranks.Shares(folder, 1, 2, session="b")
    a0.clear()
    a1.put(0, _images(1.0))
    os.utime(folder / "a.lock", (time.time() - 3600,) * 2)  # A has run for an hour
    b0.clear()  # B starts while A runs
    b1.put(0, _images(2.0))
    b1.put(1, _images(2.0))
    a1.put(1, _images(1.0))
    for shares in (a0, b0):
        for index in (0, 1):
            got = shares.gather(index, _images(0.0), [(0, 2), (2, 4)], print)
            assert torch.equal(got[2:], _images(1.0 if shares is a0 else 2.0))
    a0.clear()
    assert sorted(p.name for p in folder.iterdir()) == ["b", "b.lock"]  # B's, while it runs
    b0.clear()
    assert not folder.exists()


def test_a_crashed_evaluations_files_go_at_the_next_start(tmp_path):
    folder = tmp_path / ".rank-samples"
    crashed = ranks.Shares(folder, 0, 2, session="crashed")
    crashed.clear()
    ranks.Shares(folder, 1, 2, session="crashed").put(0, _images(1.0))
    crashed.fail(RuntimeError("out of memory"))
    del crashed  # the process is gone: nobody holds its lock
    os.utime(folder / "crashed.lock", (time.time() - 3600,) * 2)
    torch.save(_images(3.0), folder / "w000-rank00001.pt")  # an older sgdm's flat files
    (folder / "rank00001.failed").write_text("RuntimeError: an earlier crash")
    (folder / "orphan").mkdir()  # a folder without its lock
    shares = ranks.Shares(folder, 0, 2, session="new")
    shares.clear()
    assert sorted(p.name for p in folder.iterdir()) == ["new.lock"]
    shares.check(1)  # no failure of this evaluation
    shares.clear()
    assert not folder.exists()


def test_without_flock_the_start_removes_every_other_session(tmp_path, monkeypatch):
    """Some Lustre and NFS mounts have no flock: the evaluation still runs, and clears as before."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    folder = tmp_path / ".rank-samples"
    ranks.Shares(folder, 1, 2, session="old").put(0, _images(1.0))
    (folder / "old.lock").touch()
    os.utime(folder / "old.lock", (time.time() - 3600,) * 2)
    monkeypatch.setattr(fcntl, "flock", no_flock)
    shares = ranks.Shares(folder, 0, 2, session="new")
    shares.clear()
    assert sorted(p.name for p in folder.iterdir()) == ["new.lock"]
    shares.clear()
    assert not folder.exists()
