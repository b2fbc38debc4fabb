"""torch.compile of the denoiser (train.compile) and of the sampling UNet (SelfGuidedPipeline.compile).

Most tests swap Inductor for a backend that records each traced graph and runs it as traced (no
code generation): they show that the network really runs through torch.compile, that the result is
the eager one bit for bit, and that checkpoints, resumes and exports are unchanged. One test runs
Inductor itself on the tiny UNet.
"""
from __future__ import annotations

import dataclasses
import pathlib
import typing
import warnings

import pytest
import torch

from sgdm.config.core import ConfigError, from_dict
from sgdm.config.schema import ExperimentConfig, load_experiment
from sgdm.evaluation.config import EvalConfig
from sgdm.models import compile as compile_module
from sgdm.models.compile import COMPILE_MODES, compile_network
from sgdm.training.config import TrainConfig
from tests.training.helpers import assert_same_training_state, label_workdir, run_checkpoint, run_in_process, tiny_config


class RecordingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it and runs each as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.fixture
def recording(monkeypatch):
    torch._dynamo.reset()
    backend = RecordingBackend()
    monkeypatch.setattr(compile_module, "_backend", lambda: backend)
    yield backend
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    yield from label_workdir(tmp_path_factory, "compile")


_ckpt = run_checkpoint


def test_the_config_modes_are_the_ones_compile_network_takes():
    assert typing.get_args(typing.get_type_hints(TrainConfig)["compile_mode"]) == COMPILE_MODES
    assert TrainConfig().compile is False and EvalConfig().compile is False


def test_an_unknown_compile_mode_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"train\.compile_mode"):
        load_experiment(None, ["train.compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match=r"train\.compile: is not supported with strategy fsdp"):
        load_experiment(None, ["train.compile=true", "train.strategy=fsdp"])
    with pytest.raises(ValueError, match="mode: expected one of default, max-autotune-no-cudagraphs"):
        compile_network(torch.nn.Linear(2, 2), "reduce-overhead")


def test_compiled_training_is_the_eager_training_with_the_same_checkpoints(workdir, recording):
    train = {"max_steps": 4, "checkpoint_every": 2}
    eager = tiny_config(workdir, run={"name": "eager"}, train=train)
    assert run_in_process(eager) == 0
    assert recording.graphs == 0
    compiled = tiny_config(workdir, run={"name": "compiled"}, train={**train, "compile": True})
    assert run_in_process(compiled) == 0
    assert recording.graphs >= 1  # the denoiser ran through torch.compile
    # same keys (no "_orig_mod." prefix), same values: a checkpoint does not record how it was computed
    assert_same_training_state(_ckpt(eager, 4), _ckpt(compiled, 4))


def test_an_eager_run_resumes_compiled_and_matches_the_straight_run(workdir, recording):
    straight = tiny_config(workdir, run={"name": "straight"}, train={"max_steps": 4, "checkpoint_every": 2})
    assert run_in_process(straight) == 0
    split = tiny_config(workdir, run={"name": "split"}, train={"max_steps": 2, "checkpoint_every": 2})
    assert run_in_process(split) == 0
    split["train"].update(max_steps=4, compile=True)  # train.compile may change on a resume
    assert run_in_process(split, resume=True) == 0
    assert recording.graphs >= 1
    assert_same_training_state(_ckpt(straight, 4), _ckpt(split, 4))


def test_train_autoencoder_says_it_does_not_compile(tmp_path, monkeypatch):
    from sgdm.training import autoencoder

    cfg = from_dict(ExperimentConfig, tiny_config(tmp_path, train={"compile": True, "max_steps": 1}))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, autoencoder=dataclasses.replace(
        cfg.model.autoencoder, checkpoint=tmp_path / "ae.ckpt")))
    def stop(cfg):
        raise RuntimeError("stopped after the checks")

    monkeypatch.setattr(autoencoder, "check_loss_files", stop)
    with pytest.warns(UserWarning, match="train.compile compiles the denoiser"):
        with pytest.raises(RuntimeError, match="stopped after the checks"):
            autoencoder.train_autoencoder(cfg, resume=False)


def _pipeline():
    from sgdm.pipeline import SelfGuidedPipeline

    cfg = from_dict(ExperimentConfig, tiny_config(pathlib.Path("/nonexistent")))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = SelfGuidedPipeline.from_config(cfg)
        for p in pipe.unet.parameters():  # the output layer starts at zero: give every layer a say
            torch.nn.init.normal_(p, std=0.1)
    pipe.autoencoder.scale_factor.fill_(1.0)
    return pipe


def test_a_compiled_pipeline_samples_the_eager_images_and_saves_the_same_file(tmp_path, recording):
    pipe = _pipeline()
    kwargs = dict(cluster=[0, 2], guidance_scale=2.0, num_steps=3, output_type="pt")
    eager = pipe(2, generator=torch.Generator().manual_seed(5), **kwargs)
    keys = list(pipe.unet.state_dict())
    assert pipe.compile() is pipe
    compiled = pipe(2, generator=torch.Generator().manual_seed(5), **kwargs)
    assert recording.graphs >= 1
    assert torch.equal(eager, compiled)
    assert list(pipe.unet.state_dict()) == keys
    from safetensors import safe_open

    with safe_open(str(pipe.save_pretrained(tmp_path / "p")), framework="pt") as f:
        assert sorted(k for k in f.keys() if k.startswith("unet.")) == sorted(f"unet.{k}" for k in keys)


def test_sample_command_compiles_with_the_flag(tmp_path, recording, monkeypatch):
    from sgdm.cli import main as cli

    pipe = _pipeline()
    run = pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "grid.png"
    assert cli.main(["sample", str(run), "-n", "2", "--cluster", "1", "--steps", "2", "-o", str(out)]) == 0
    assert recording.graphs == 0
    assert cli.main(["sample", str(run), "-n", "2", "--cluster", "1", "--steps", "2", "-o", str(out),
                     "--compile"]) == 0
    assert recording.graphs >= 1 and out.is_file()


def test_eval_flag_sets_eval_compile():
    import argparse

    from sgdm.cli.evaluate import add_parser, eval_config_from_args

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    assert eval_config_from_args({"compile": True}, parser.parse_args(["run"])).compile is True
    assert eval_config_from_args({}, parser.parse_args(["run"])).compile is False
    assert eval_config_from_args({}, parser.parse_args(["run", "--compile"])).compile is True


def test_inductor_compiles_the_tiny_unet_forward_and_backward(one_thread):
    """The real backend: Inductor's generated code (C++ on the CPU) gives the eager loss and gradients."""
    from sgdm.models.conditioning import condition_dims
    from sgdm.models.unet import UNet

    torch._dynamo.reset()
    # one level (a ResBlock, attention, the middle block and the output): the compile takes seconds per op
    cfg = from_dict(ExperimentConfig, tiny_config(pathlib.Path("/nonexistent"), model={
        "unet": {"channel_mult": [1], "attention_resolutions": [16]}}))
    gen = torch.Generator().manual_seed(0)
    unet = UNet(cfg.model.unet, *condition_dims(cfg.model.guidance))
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    x = torch.randn(2, 2, 16, 16, generator=gen)
    t = torch.tensor([3, 70])
    cond = torch.eye(3)[[0, 2]]

    def loss_and_grads():
        unet.zero_grad()
        loss = unet(x, t, cond, None).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in unet.parameters()]

    want, want_grads = loss_and_grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Inductor's notes about the machine (no CUDA runtime etc.)
        compile_network(unet)
        got, got_grads = loss_and_grads()
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flag", [True, False])
def test_evaluate_run_compiles_the_pipeline_with_eval_compile(monkeypatch, flag):
    from sgdm.evaluation import evaluate

    calls = []
    pipe = type("Pipe", (), {"compile": lambda self: calls.append("compile"), "autoencoder": None})()
    cfg = from_dict(ExperimentConfig, tiny_config(pathlib.Path("/nonexistent")))
    monkeypatch.setattr(evaluate, "load_run_weights", lambda run_dir, device: (cfg, pipe, {"file": "", "step": 0}))

    def evaluator(*args, **kwargs):
        calls.append("evaluator")
        raise RuntimeError("stop")

    monkeypatch.setattr(evaluate, "_Evaluator", evaluator)
    with pytest.raises(RuntimeError, match="stop"):
        evaluate.evaluate_run("run", dataclasses.replace(cfg.eval, compile=flag, device="cpu"))
    assert calls == (["compile", "evaluator"] if flag else ["evaluator"])
