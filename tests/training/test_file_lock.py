"""exclusive_lock: one process at a time; a waiter says who it waits for."""
from __future__ import annotations

import subprocess
import sys
import time

from sgdm.training.file_lock import exclusive_lock

HOLD = """
import sys, time
from sgdm.training.file_lock import exclusive_lock
with exclusive_lock(sys.argv[1], "x"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_process_waits_for_the_lock_and_says_why(tmp_path, capsys):
    lock = tmp_path / "sub" / ".lock"  # its directory is created
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with exclusive_lock(lock, "the latent cache /data/latents", notice_after=0.2, poll=0.05):
            waited = time.monotonic() - start
    finally:
        holder.wait(timeout=60)
    assert waited > 1.0  # the holder kept it 1.5 s after saying so
    err = capsys.readouterr().err
    assert err.count("waiting for another process that is building the latent cache /data/latents") == 1
    assert str(lock) in err


def test_the_lock_is_free_again_after_the_block_and_after_an_error(tmp_path, capsys):
    lock = tmp_path / ".lock"
    try:
        with exclusive_lock(lock, "x"):
            raise KeyError("inside")
    except KeyError:
        pass
    holder = subprocess.run([sys.executable, "-c", HOLD, str(lock), "0"], capture_output=True, text=True, timeout=60)
    assert holder.stdout.strip() == "held"
    with exclusive_lock(lock, "x", notice_after=0.0):
        pass
    assert capsys.readouterr().err == ""  # free: no wait, no notice
