"""Ctrl+C during training: the first stops after the batch with a checkpoint (exit 130, as SIGTERM's 143),
a second stops at once. Lightning's own answer was a 'graceful shutdown' without a checkpoint, exit 1.
The end-to-end case (a resume ending bit for bit as an uninterrupted run) is in test_kill_points."""
from __future__ import annotations

import signal
import threading

import pytest

from sgdm.training.callbacks import StepCheckpoint
from sgdm.training.data import ignore_stop_signals


def test_the_first_ctrl_c_is_noted_and_the_second_stops_at_once(tmp_path, capsys):
    callback = StepCheckpoint(tmp_path, every=10, keep=2)
    before = signal.getsignal(signal.SIGINT)
    try:
        callback._note_sigint(signal.SIGINT, None)
        assert callback.signalled and callback.signal_name == "SIGINT"
        assert "Ctrl+C again stops at once" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            callback._note_sigint(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_sigterm_first_keeps_its_name(tmp_path):
    callback = StepCheckpoint(tmp_path, every=10, keep=2)
    callback._note_sigterm(signal.SIGTERM, None)
    before = signal.getsignal(signal.SIGINT)
    try:
        callback._note_sigint(signal.SIGINT, None)  # noted, not an immediate stop: the first Ctrl+C
    finally:
        signal.signal(signal.SIGINT, before)
    assert callback.signal_name == "SIGTERM"


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread only")
def test_the_handlers_are_installed_for_training_and_put_back(tmp_path):
    callback = StepCheckpoint(tmp_path, every=10, keep=2)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    callback.setup(None, None, "fit")
    callback._check_same_start = lambda trainer, module: None
    callback.on_train_start(None, None)
    try:
        assert signal.getsignal(signal.SIGINT) == callback._note_sigint
        assert signal.getsignal(signal.SIGTERM) == callback._note_sigterm
    finally:
        callback.teardown(None, None, "fit")
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_training_loader_workers_ignore_ctrl_c():
    """A terminal's Ctrl+C reaches DataLoader workers too; one that ended on it made the main process fail
    ('worker exited unexpectedly') before its checkpoint."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ignore_stop_signals(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
