"""What keeps the training step free of per-step host syncs on a GPU, pinned on the CPU: the fused
finiteness check, the EMA's fused lerp, the CPU-resident batch keys and timesteps."""
from __future__ import annotations

import copy

import pytest
import torch

from sgdm.diffusion.schedule import NoiseSchedule, make_betas, q_sample, v_target
from sgdm.training.ema import update_ema
from sgdm.training.config import TrainConfig
from sgdm.training.module import LatentDiffusionModule, all_finite

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(_INT[x.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_finds_nan_and_inf_and_leaves_every_bit(dtype):
    xs = [torch.randn(7, 5, dtype=dtype) * 100, torch.randn(4, 6, dtype=dtype)[:, ::2],
          torch.tensor([torch.finfo(dtype).tiny / 4, -0.0, torch.finfo(dtype).max], dtype=dtype)]
    before = [x.clone() for x in xs]
    verdict = all_finite(xs)
    assert isinstance(verdict, torch.Tensor) and verdict.dim() == 0 and bool(verdict)
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(xs, before))  # subnormals and -0 too
    for bad in (float("nan"), float("inf"), -float("inf")):
        ys = [x.clone() for x in xs]
        ys[1][2, 1] = bad
        assert not bool(all_finite(ys))


def test_all_finite_over_mixed_dtypes_and_no_tensors():
    xs = [torch.randn(3), torch.randn(3, dtype=torch.float64)]
    assert bool(all_finite(xs))
    xs[1][0] = float("nan")
    assert not bool(all_finite(xs))
    assert all_finite([]) is True


def test_update_ema_is_the_per_parameter_lerp_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3).double())
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.data.normal_()
    expected = copy.deepcopy(ema)
    with torch.no_grad():
        for e, p in zip(expected.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - 0.93)
    update_ema(ema, model, 0.93)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), expected.parameters()))


def _module() -> LatentDiffusionModule:
    unet, first_stage = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    return LatentDiffusionModule(unet, first_stage, None, None, TrainConfig(), None, 0.0, 0)


def test_position_and_flipped_stay_on_the_cpu_when_the_batch_moves():
    batch = {"mean": torch.zeros(2, 3), "logvar": torch.zeros(2, 3), "id": ["a", "b"],
             "flipped": torch.tensor([True, False]), "position": torch.tensor([4, 4])}
    moved = _module().transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved.keys() == batch.keys()
    assert moved["mean"].device.type == "meta" and moved["logvar"].device.type == "meta"
    assert moved["position"] is batch["position"] and moved["flipped"] is batch["flipped"]
    assert moved["id"] == ["a", "b"]


def test_q_sample_and_v_target_index_the_schedule_where_t_is():
    schedule = NoiseSchedule.from_betas(make_betas("linear", 50, 1e-4, 2e-2))
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 17, 49])
    a = schedule.alpha_bar[t]
    expected = a.sqrt().float().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().float().view(-1, 1, 1, 1) * noise
    assert torch.equal(q_sample(schedule, x0, t, noise), expected)
    v = a.sqrt().float().view(-1, 1, 1, 1) * noise - (1 - a).sqrt().float().view(-1, 1, 1, 1) * x0
    assert torch.equal(v_target(schedule, x0, t, noise), v)
    with pytest.raises(ValueError, match="timesteps must be in"):
        q_sample(schedule, x0, torch.tensor([0, 1, 50]), noise)
