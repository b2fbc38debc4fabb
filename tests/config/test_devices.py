"""Device names in configs and flags: spelled right when validated, present when resolved."""
from __future__ import annotations

import pytest
import torch

from sgdm.annotation.config import AnnotationConfig
from sgdm.config.core import ConfigError, check_device, from_dict
from sgdm.devices import resolve_device
from sgdm.evaluation.config import EvalConfig
from sgdm.features_pretrain.config import PretrainConfig


# ids not spelled "cuda": conftest skips tests with that keyword (the cuda marker) on machines without a GPU
@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"], ids=lambda v: f"spelled-{v}")
def test_device_spellings_accepted(value):
    check_device("x.device", value)


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cpu:0", "CUDA", " cpu", "cuda0", ""],
                         ids=lambda v: f"spelled-{v!r}")
def test_device_misspellings_name_the_key(value):
    with pytest.raises(ConfigError, match=r"^x\.device: expected auto, cpu, cuda or cuda:N, got "):
        check_device("x.device", value)


@pytest.mark.parametrize("section, path", [(AnnotationConfig, "annotation"), (EvalConfig, "eval"),
                                           (PretrainConfig, "prepare.pretrain")])
def test_every_section_with_a_device_checks_its_spelling(section, path):
    with pytest.raises(ConfigError, match=rf"^{path}\.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        from_dict(section, {"device": "gpu"}, path)


def test_resolve_auto_and_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", "eval.device") == torch.device("cpu")
    assert resolve_device("cpu", "eval.device") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^eval\.device: 'cuda', but torch sees no CUDA device on this machine"):
        resolve_device("cuda", "eval.device")
    with pytest.raises(ConfigError, match=r"^--device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"):
        resolve_device("cuda:x", "--device")


def test_resolve_with_gpus_takes_the_local_rank_and_checks_the_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun, each process its own GPU
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:1", "annotation.device") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"^annotation\.device: 'cuda:2', but torch sees 2 CUDA device\(s\)"):
        resolve_device("cuda:2", "annotation.device")


def test_accelerator_needs_the_gpus_it_names(monkeypatch):
    from sgdm.devices import check_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_accelerator("auto", 1)
    check_accelerator("cpu", 2)  # two CPU processes: Lightning's business
    for accelerator in ("gpu", "cuda"):
        with pytest.raises(ConfigError, match=rf"^train\.accelerator: '{accelerator}', but torch sees no CUDA device"):
            check_accelerator(accelerator, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_accelerator("gpu", 2)
    check_accelerator("gpu", "auto")
    with pytest.raises(ConfigError, match=r"^train\.devices: 4 GPUs per node, but torch sees 2 CUDA device\(s\)"):
        check_accelerator("gpu", 4)


def test_train_for_a_gpu_on_a_machine_without_one_fails_before_preparing_anything(tmp_path, monkeypatch, capsys):
    """The quickstart config prepares data, a first stage and annotations before training: minutes,
    which a GPU run on a machine without a GPU must not spend before it fails."""
    import pathlib

    from sgdm.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    config = pathlib.Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    for command in ("train", "train-autoencoder"):
        extra = ["model.autoencoder.checkpoint=ae.ckpt"] if command == "train-autoencoder" else []
        assert main([command, str(config), "train.accelerator=gpu", *extra]) == 2
        assert "train.accelerator: 'gpu', but torch sees no CUDA device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_no_cuda_hint_names_every_override_a_cpu_run_needs(monkeypatch):
    from sgdm.devices import check_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:  # a paper config: 8 GPUs, DDP, bf16
        check_accelerator("gpu", 8, strategy="ddp", precision="bf16-mixed")
    assert str(err.value).endswith("override train.accelerator=cpu train.devices=1 train.strategy=auto "
                                   "train.precision=32")
    with pytest.raises(ConfigError) as err:
        check_accelerator("cuda", 1, precision="32")
    assert str(err.value).endswith("override train.accelerator=cpu")


def test_cpu_ddp_with_more_processes_than_cores_warns(monkeypatch):
    import warnings

    import sgdm.devices
    from sgdm.devices import check_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sgdm.devices, "_usable_cores", lambda: 2)
    for accelerator in ("auto", "cpu"):
        with pytest.warns(UserWarning, match=r"train\.devices=8 on the CPU starts 8 processes on 2 usable core"):
            check_accelerator(accelerator, 8, strategy="ddp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_accelerator("cpu", 2, strategy="ddp")  # as many processes as cores
        check_accelerator("auto", "auto")
