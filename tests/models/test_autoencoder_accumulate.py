"""train-autoencoder with ``train.accumulate``: micro-batches of one optimiser step add up to its batch."""
from __future__ import annotations

import pytest
import torch

from sgdm.cli.main import main
from tests.training.helpers import load_checkpoint, tiny_config, write_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """These convolutions are tiny: on a shared 2-core machine two threads made a step ~10x slower than one."""
    yield


def _config(tmp_path, name: str, *, accumulate: int, max_steps: int, dropout: float = 0.0, disc_start: int = 100,
            **train):
    """The tiny config (24 shape images, batch 4) for an autoencoder run named ``name``."""
    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig

    ae = {"checkpoint": str(tmp_path / f"{name}.ckpt"), "dropout": dropout,
          "loss": {"perceptual_weight": 0.0, "disc_start": disc_start, "disc_channels": 8, "disc_num_layers": 2}}
    cfg = tiny_config(tmp_path, run={"name": name},
                      model={"guidance": {"kind": "none", "num_classes": 0, "drop_prob": 0.0}, "autoencoder": ae},
                      train={"accumulate": accumulate, "max_steps": max_steps, "checkpoint_every": 1, **train})
    return from_dict(ExperimentConfig, cfg)


def _final(tmp_path, name: str, step: int) -> dict:
    return load_checkpoint(tmp_path / "runs" / name / "checkpoints" / f"step-{step:08d}.ckpt")


def test_accumulated_micro_batches_train_as_the_whole_batch(tmp_path, monkeypatch):
    """3 steps of batch 4 as 2 micro-batches of 2 == 3 steps of batch 4 (dropout 0, discriminator off),
    in float64: the same images (positions 2s, 2s + 1 hold step s's batch), the same posterior noise
    (drawn for the step's batch and sliced, not per micro-batch), gradients of the batch mean (Adam's
    moments compare them: its update alone hardly changes with the gradients' scale)."""
    from sgdm.training.autoencoder import _build, train_autoencoder
    from sgdm.training.config import TrainConfig

    monkeypatch.setattr(TrainConfig, "precision_name", property(lambda self: "64-true"))
    steps = 3
    for accumulate in (1, 2):
        assert train_autoencoder(_config(tmp_path, f"acc{accumulate}", accumulate=accumulate,
                                         max_steps=steps)) == 0
    one, two = (_final(tmp_path, f"acc{a}", steps) for a in (1, 2))
    initial = _build(_config(tmp_path, "acc1", accumulate=1, max_steps=steps))[0].state_dict()
    moved = 0.0
    for key, value in one["state_dict"].items():
        # every weight in float64; the latent scale factor stays float32 whatever the weights' dtype
        assert value.dtype == torch.float64 or not value.is_floating_point() or key.endswith("scale_factor"), key
        # atol: attention's key bias has a zero gradient in exact arithmetic (softmax ignores a shift of
        # all logits), and Adam turns its round-off (~1e-16) into steps of ~1e-11
        torch.testing.assert_close(two["state_dict"][key], value, rtol=1e-9, atol=1e-9, equal_nan=True, msg=key)
        name = key.removeprefix("autoencoder.")
        if name in initial and value.is_floating_point() and not name.endswith("scale_factor"):
            moved = max(moved, float((value - initial[name].double()).abs().max()))
    assert moved > 1e-3  # the comparison above is many orders of magnitude tighter than training's changes
    for sa, sb in zip(one["optimizer_states"], two["optimizer_states"], strict=True):
        assert sa["state"].keys() == sb["state"].keys()
        for index, state in sa["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(sb["state"][index][name], value, rtol=1e-9, atol=1e-12,
                                           msg=f"optimizer state {index}.{name}")
    assert two["sgdm"] == one["sgdm"] == {"step": steps}


class _Recorder:
    """Which optimizer steps after which micro-batch, and whose gradients each backward changes."""

    def __init__(self):
        import pytorch_lightning as pl

        recorder = self

        class Callback(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                recorder.position = int(batch["position"][0])

            def on_after_backward(self, trainer, pl_module):
                recorder.backward(pl_module)

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                index = [o is getattr(optimizer, "optimizer", optimizer) for o in trainer.optimizers].index(True)
                recorder.steps.append((("ae", "disc")[index], recorder.position))
                recorder.grads = None  # every gradient is None again before the next backward (zero_grad)

        self.callback = Callback()
        self.position, self.steps, self.changed, self.grads = -1, [], [], None

    @staticmethod
    def _snapshot(pl_module) -> dict:
        groups = {"ae": [*pl_module.autoencoder.parameters(), pl_module.loss.logvar],
                  "disc": list(pl_module.loss.discriminator.parameters())}
        return {k: [None if p.grad is None else p.grad.clone() for p in ps] for k, ps in groups.items()}

    def backward(self, pl_module) -> None:
        grads = self._snapshot(pl_module)
        before = self.grads or {k: [None] * len(v) for k, v in grads.items()}
        same = {k: all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                       for a, b in zip(before[k], grads[k], strict=True)) for k in grads}
        self.changed.append((self.position, tuple(k for k in grads if not same[k])))
        self.grads = grads


def test_both_optimizers_step_once_per_accumulated_step_and_keep_their_gradients_apart(tmp_path):
    """accumulate 2, discriminator from step 1: the autoencoder's optimizer steps after positions 1, 3, 5,
    the discriminator's after 3, 5 (not after every micro-batch); the generator's backward leaves the
    discriminator's gradients as they were and the discriminator's the autoencoder's (toggle_model)."""
    from sgdm.training.autoencoder import train_autoencoder

    recorder = _Recorder()
    cfg = _config(tmp_path, "steps", accumulate=2, max_steps=3, disc_start=1)
    assert train_autoencoder(cfg, callbacks=[recorder.callback]) == 0
    assert recorder.steps == [("ae", 1), ("ae", 3), ("disc", 3), ("ae", 5), ("disc", 5)]
    assert recorder.changed == [(0, ("ae",)), (1, ("ae",)),
                                (2, ("ae",)), (2, ("disc",)), (3, ("ae",)), (3, ("disc",)),
                                (4, ("ae",)), (4, ("disc",)), (5, ("ae",)), (5, ("disc",))]
    ckpt = _final(tmp_path, "steps", 3)
    assert ckpt["sgdm"] == {"step": 3}
    ae_state, disc_state = (s["state"] for s in ckpt["optimizer_states"])
    assert {int(s["step"]) for s in ae_state.values()} == {3}  # Adam's own count of its steps
    assert {int(s["step"]) for s in disc_state.values()} == {2}


def _sigterm_at(position: int):
    """A callback that sends this process a SIGTERM when the micro-batch at ``position`` starts
    (Lightning's handler flags it; the step checkpoint callback saves and training stops)."""
    import os
    import signal

    import pytorch_lightning as pl

    class SigtermAt(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if int(batch["position"][0]) == position:
                os.kill(os.getpid(), signal.SIGTERM)

    return SigtermAt()


def test_resume_with_accumulation_continues_exactly(tmp_path):
    """4 steps straight == 2 steps then --resume to 4 == a SIGTERM in the first micro-batch of step 2
    (its partial accumulation dropped, the checkpoint at step 2) then --resume to 4; accumulate 2, dropout
    0.3, the discriminator from step 1. The resumed loader restarts at position 2 * step, the dropout and
    posterior noise are those of the same positions and steps."""
    from sgdm.training.autoencoder import train_autoencoder
    from sgdm.training.run import EXIT_SIGTERM

    def run(name, max_steps, resume, callbacks=()):
        torch.manual_seed(max_steps + resume)  # whatever the global RNG holds when a segment starts
        return train_autoencoder(_config(tmp_path, name, accumulate=2, max_steps=max_steps, dropout=0.3,
                                         disc_start=1), resume=resume, callbacks=callbacks)

    assert run("straight", 4, False) == 0
    assert run("resumed", 2, False) == 0 and run("resumed", 4, True) == 0
    assert run("stopped", 4, False, [_sigterm_at(4)]) == EXIT_SIGTERM
    saved = sorted(p.name for p in (tmp_path / "runs" / "stopped" / "checkpoints").glob("*.ckpt"))
    assert saved[-1] == "step-00000002.ckpt", saved
    assert run("stopped", 4, True) == 0
    a = _final(tmp_path, "straight", 4)
    for other in ("resumed", "stopped"):
        b = _final(tmp_path, other, 4)
        assert a["sgdm"] == b["sgdm"] == {"step": 4}
        for key, value in a["state_dict"].items():
            assert torch.equal(value, b["state_dict"][key]) or key.endswith("scale_factor"), (other, key)
        for sa, sb in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
            assert sa["state"].keys() == sb["state"].keys() and sa["state"]
            for index, state in sa["state"].items():
                for name, value in state.items():
                    assert torch.equal(value, sb["state"][index][name]), f"{other}: optimizer state {index}.{name}"


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.accumulate=3"], "config error: train.batch_size: 4 is the global batch per optimiser step and must "
                             "divide by devices x num_nodes x accumulate = 3"),
    (["train.accumulate=0"], "config error: train.accumulate: must be >= 1, got 0"),
    (["train.batch_size=64", "train.accumulate=2"], "config error: train.batch_size: 64 (with train.accumulate=2: "
                                                    "32 images per micro-batch) is larger than the dataset (24"),
])
def test_bad_accumulate_is_a_config_error_before_any_work(tmp_path, capsys, overrides, message):
    from tests.models.test_autoencoder_training import _ae_config

    path = write_config(tmp_path, _ae_config(tmp_path))
    assert main(["train-autoencoder", str(path), "run.name=ae", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "runs" / "ae").exists()


def test_a_config_built_in_code_is_checked_too(tmp_path):
    """The quickstart builds its autoencoder budget with dataclasses.replace, past the config's validation:
    a batch that accumulate does not divide is refused before the run directory is written."""
    import dataclasses

    from sgdm.config.core import ConfigError
    from sgdm.training.autoencoder import train_autoencoder

    cfg = _config(tmp_path, "built", accumulate=1, max_steps=2)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, accumulate=3))
    with pytest.raises(ConfigError, match=r"train\.batch_size: 4 does not divide by world size 1 x accumulate 3"):
        train_autoencoder(cfg)
    assert not (tmp_path / "runs" / "built").exists()


def test_resume_refuses_another_accumulate(tmp_path):
    """As for the denoiser: accumulate splits each step's batch differently (the discriminator's BatchNorm,
    the dropout draws), so a resume must keep it; before, the autoencoder trainer ignored the key."""
    from sgdm.config.core import ConfigError
    from sgdm.training.autoencoder import train_autoencoder

    assert train_autoencoder(_config(tmp_path, "run", accumulate=2, max_steps=1)) == 0
    with pytest.raises(ConfigError, match=r"train\.accumulate: differs from the run's saved config .* \(2 -> 1\)"):
        train_autoencoder(_config(tmp_path, "run", accumulate=1, max_steps=2), resume=True)


def test_discriminator_gradients_follow_a_loss_scale_changed_by_the_autoencoders_step(generator):
    """16-mixed: the GradScaler updates after each optimizer's step. An overflow in the autoencoder's
    gradients skips its step and halves the scale; the discriminator's gradients, made at the old scale,
    must still step as the unscaled gradients (not twice them)."""
    from types import SimpleNamespace

    from sgdm.models.autoencoder import AutoencoderKL
    from sgdm.models.autoencoder_losses import AutoencoderLoss
    from sgdm.training.autoencoder import AutoencoderModule
    from sgdm.training.config import TrainConfig
    from tests.models.helpers import tiny_autoencoder_config

    cfg = tiny_autoencoder_config()
    module = AutoencoderModule(AutoencoderKL(cfg), AutoencoderLoss(cfg.loss, cfg.in_channels), TrainConfig(), seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))  # as the first backward does
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), should_stop=False, world_size=1)
    module._step_samples = 2  # as the step's training_step calls count them (a step with none stops the run)

    class Stepper:  # Lightning's manual step under 16-mixed: the scaler's step, then its update
        def __init__(self, params):
            self.optimizer = torch.optim.SGD(params, lr=1.0)

        def step(self):
            scaler.step(self.optimizer)
            scaler.update()

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none=set_to_none)

    ae_params, d_params = list(module.autoencoder.parameters()), list(module.loss.discriminator.parameters())
    for p in ae_params:
        p.grad = torch.full_like(p, float("inf"))
    unscaled = [torch.randn(p.shape, generator=generator) for p in d_params]
    for p, g in zip(d_params, unscaled):
        p.grad = 8.0 * g
    ae_before, d_before = [p.detach().clone() for p in ae_params], [p.detach().clone() for p in d_params]
    module._finish_step(Stepper(ae_params), Stepper(d_params))
    assert scaler.get_scale() == 4.0  # the overflow halved it
    assert all(torch.equal(p, b) for p, b in zip(ae_params, ae_before))  # skipped
    for p, b, g in zip(d_params, d_before, unscaled):
        torch.testing.assert_close(p.detach(), b - g)
    assert module.step == 1


_FLOAT64_CLI = """import sys
from sgdm.training.config import TrainConfig
TrainConfig.precision_name = property(lambda self: "64-true")  # Lightning's DDP runs this script on each rank
from sgdm.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ddp_with_accumulation_matches_one_process(tmp_path, monkeypatch):
    """2 processes x accumulate 2 == 1 process x accumulate 4 (one image per micro-batch in both, so the
    discriminator's BatchNorm sees the same batches), discriminator from step 1, float64: no_sync on the
    first micro-batch, the all-reduce on the last, each rank's slice of the step's posterior noise."""
    import os
    import subprocess
    import sys

    from sgdm.training.autoencoder import train_autoencoder
    from sgdm.training.config import TrainConfig

    monkeypatch.setattr(TrainConfig, "precision_name", property(lambda self: "64-true"))
    assert train_autoencoder(_config(tmp_path, "single", accumulate=4, max_steps=3, disc_start=1)) == 0
    cfg = tiny_config(tmp_path, run={"name": "ddp"},
                      model={"guidance": {"kind": "none", "num_classes": 0, "drop_prob": 0.0},
                             "autoencoder": {"checkpoint": str(tmp_path / "ddp.ckpt"),
                                             "loss": {"perceptual_weight": 0.0, "disc_start": 1, "disc_channels": 8,
                                                      "disc_num_layers": 2}}},
                      train={"accumulate": 2, "max_steps": 3, "checkpoint_every": 3, "devices": 2, "strategy": "ddp"})
    script = tmp_path / "float64_cli.py"
    script.write_text(_FLOAT64_CLI)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), "train-autoencoder", str(write_config(tmp_path, cfg, "ddp.yaml"))],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    one, ddp = _final(tmp_path, "single", 3), _final(tmp_path, "ddp", 3)
    assert one["sgdm"] == ddp["sgdm"] == {"step": 3}
    for key, value in one["state_dict"].items():
        if key.startswith("loss.discriminator.") and "running_" in key or key.endswith("num_batches_tracked"):
            continue  # each rank's BatchNorm statistics of its own images
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-9, atol=1e-9, equal_nan=True, msg=key)
    for sa, sb in zip(one["optimizer_states"], ddp["optimizer_states"], strict=True):
        for index, state in sa["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(sb["state"][index][name], value, rtol=1e-9, atol=1e-12,
                                           msg=f"optimizer state {index}.{name}")
