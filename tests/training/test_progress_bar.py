"""The progress bar costs no host sync per step: Lightning turns every prog_bar metric into a
Python number after every batch (bar or no bar), so only host numbers may be prog_bar metrics;
the loss reaches the bar as a host copy read once per ``train.log_every`` steps."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl

from sgdm.config.core import from_dict
from sgdm.config.schema import ExperimentConfig
from sgdm.training.run import train
from tests.training.helpers import make_label_store, tiny_config


class RecordLogs(pl.Callback):
    """(step, name, value, prog_bar, via _log_host) of every self.log, and the bar's last metrics."""

    def __init__(self):
        self.logs, self.bar = [], None

    def on_train_start(self, trainer, module):
        log, log_host, host = module.log, module._log_host, [False]

        def recording_log(name, value, *args, **kwargs):
            self.logs.append((module.step, name, float(value), kwargs.get("prog_bar", False), host[0]))
            return log(name, value, *args, **kwargs)

        def recording_log_host(*args, **kwargs):
            host[0] = True
            try:
                return log_host(*args, **kwargs)
            finally:
                host[0] = False

        module.log, module._log_host = recording_log, recording_log_host

    def on_train_end(self, trainer, module):
        self.bar = dict(trainer.progress_bar_metrics)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_prog_bar_metrics_are_host_numbers_and_the_loss_is_read_every_log_every_steps(tmp_path, accumulate):
    cfg = tiny_config(tmp_path, train={"max_steps": 7, "log_every": 3, "progress_bar": True, "accumulate": accumulate,
                                       "checkpoint_every": 100})
    make_label_store(cfg)
    record = RecordLogs()
    assert train(from_dict(ExperimentConfig, cfg), callbacks=[record]) == 0
    on_bar = {(name, host) for _, name, _, bar, host in record.logs if bar}
    assert on_bar == {("loss", True), ("train/images_per_sec", True)}  # no device tensor on the bar
    losses = [(step, value) for step, name, value, _, _ in record.logs if name == "train/loss"]
    shown = [(step, value) for step, name, value, _, _ in record.logs if name == "loss"]
    assert len(losses) == 7 * accumulate
    # the last micro-batch's loss of steps 0, 3 and 6
    assert shown == [losses[(s + 1) * accumulate - 1] for s in (0, 3, 6)]
    assert [s for s, _ in shown] == [0, 3, 6]
    assert record.bar["loss"] == pytest.approx(shown[-1][1])
    assert "train/loss" not in record.bar



def test_the_autoencoder_trainer_puts_host_numbers_only_on_the_bar(tmp_path, one_thread):
    from sgdm.training.autoencoder import train_autoencoder

    ae = {"checkpoint": str(tmp_path / "ae.ckpt"),
          "loss": {"perceptual_weight": 0.0, "disc_start": 2, "disc_channels": 8, "disc_num_layers": 2}}
    cfg = tiny_config(tmp_path, run={"name": "ae"}, model={"guidance": {"kind": "none", "num_classes": 0,
                                                                         "drop_prob": 0.0}, "autoencoder": ae},
                      train={"max_steps": 4, "log_every": 3, "progress_bar": True, "accumulate": 2,
                             "checkpoint_every": 100})
    record = RecordLogs()
    assert train_autoencoder(from_dict(ExperimentConfig, cfg), callbacks=[record]) == 0
    assert {(name, host) for _, name, _, bar, host in record.logs if bar} == {("loss", True)}
    losses = [(step, value) for step, name, value, _, _ in record.logs if name == "autoencoder/loss"]
    shown = [(step, value) for step, name, value, _, _ in record.logs if name == "loss"]
    assert len(losses) == 4 * 2 and [s for s, _ in shown] == [0, 3]
    assert shown == [losses[(s + 1) * 2 - 1] for s in (0, 3)]  # the last micro-batch of steps 0 and 3
    assert set(record.bar) == {"loss"}
