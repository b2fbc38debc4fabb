"""The denoiser's AdamW on the CPU: the fused kernel, the same update as PyTorch's per-tensor AdamW up to rounding."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch


def _module(tmp_path):
    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.training.run import build_module
    from tests.training.helpers import tiny_config

    cfg = from_dict(ExperimentConfig, tiny_config(tmp_path, model={"guidance": {"kind": "none"}},
                                                  train={"weight_decay": 0.01}))
    return build_module(cfg)


def _adamw(module):
    return module.configure_optimizers()["optimizer"]


def test_a_cpu_run_steps_the_fused_adamw_with_the_per_tensor_update(tmp_path):
    module = _module(tmp_path)
    reference_unet = copy.deepcopy(module.unet)
    initial = [p.detach().clone() for p in module.unet.parameters()]
    opt = _adamw(module)
    assert opt.defaults["fused"] is True
    c, lr = module.train_cfg, opt.param_groups[0]["lr"]  # the warm-up schedule's first lr
    reference = torch.optim.AdamW(reference_unet.parameters(), lr=lr, betas=tuple(c.betas), eps=c.adam_eps,
                                  weight_decay=c.weight_decay, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(module.unet.parameters(), reference_unet.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        reference.step()
    for p, q in zip(module.unet.parameters(), reference_unet.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)
    assert any(not torch.equal(p, q) for p, q in zip(module.unet.parameters(), initial))  # the steps moved them


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_keeps_the_unfused_adamw(tmp_path, monkeypatch, precision):
    """Lightning's mixed precision refuses gradient clipping for a fused optimiser (one that may unscale
    fp16 gradients itself), bf16 too."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    module = _module(tmp_path)
    trainer = SimpleNamespace(precision_plugin=MixedPrecision(precision, "cpu"))
    monkeypatch.setattr(module, "_trainer", trainer)
    assert not _adamw(module).defaults["fused"]
