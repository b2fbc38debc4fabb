"""Two processes on this machine as torchrun or SLURM's srun starts them (gloo on the CPU), for the
tests of several processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

# torchrun with two processes on this machine; the command (a module run with -m) follows
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun_tasks(command: list[str], env: dict, job_name: str, stdout=subprocess.PIPE,
               per_node: bool = True) -> list[subprocess.Popen]:
    """Two tasks of one node started with the variables srun sets (Lightning's SLURMEnvironment and
    :mod:`sgdm.launch` read them); their output to ``stdout`` (text), stderr with it. ``per_node=False``:
    as ``srun --ntasks 2`` starts them, without ``SLURM_NTASKS_PER_NODE``."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_JOB_NAME": job_name, "SLURM_JOB_ID": "1234", "SLURM_NODELIST": "127.0.0.1",
             "MASTER_PORT": str(free_port())}
    if not per_node:
        del slurm["SLURM_NTASKS_PER_NODE"]
    return [subprocess.Popen(command, env={**env, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                             stdout=stdout, stderr=subprocess.STDOUT, text=True) for r in range(2)]


def leave_process() -> None:
    """End a spawned test rank at once, once its process group is destroyed and its results are written.
    At the interpreter's exit gloo's threads now and then abort it ("terminate called without an active
    exception", SIGABRT: 1 run in 6-10 of tests/annotation/test_resume_distributed.py on 2 cores), which
    fails the test after the rank did everything it was asked."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
