"""Schedules against float64 formulas, q_sample, configs and the loss."""
import math

import pytest
import torch

from sgdm.config.core import ConfigError, from_dict
from sgdm.diffusion.config import DiffusionConfig, SamplerConfig
from sgdm.diffusion.losses import diffusion_loss, sample_timesteps
from sgdm.diffusion.schedule import NoiseSchedule, eps_from_output, make_schedule, q_sample, v_target


def _alpha_bar(betas):
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return out


def test_linear_schedule_matches_formula():
    s = make_schedule(DiffusionConfig(schedule="linear", timesteps=1000))
    betas = [1e-4 + (2e-2 - 1e-4) * t / 999 for t in range(1000)]
    assert s.betas.dtype == s.alpha_bar.dtype == torch.float64
    assert torch.allclose(s.betas, torch.tensor(betas, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.allclose(s.alpha_bar, torch.tensor(_alpha_bar(betas), dtype=torch.float64), rtol=1e-10, atol=0)


def test_scaled_linear_is_ldms_default():
    s = make_schedule(DiffusionConfig())
    betas = [(math.sqrt(0.0015) + (math.sqrt(0.0155) - math.sqrt(0.0015)) * t / 999) ** 2 for t in range(1000)]
    assert torch.allclose(s.betas, torch.tensor(betas, dtype=torch.float64), rtol=1e-12, atol=0)
    assert s.betas[0].item() == pytest.approx(0.0015) and s.betas[-1].item() == pytest.approx(0.0155)


def test_cosine_schedule_matches_nichol_dhariwal():
    T, s_off = 50, 0.008
    s = make_schedule(DiffusionConfig(schedule="cosine", timesteps=T))
    f = [math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = [min(1 - f[t + 1] / f[t], 0.999) for t in range(T)]
    assert torch.allclose(s.betas, torch.tensor(betas, dtype=torch.float64), rtol=1e-10, atol=1e-14)
    assert torch.allclose(s.alpha_bar, torch.tensor(_alpha_bar(betas), dtype=torch.float64), rtol=1e-9)


def test_q_sample_and_v_target(generator):
    s = make_schedule(DiffusionConfig(timesteps=100))
    x0 = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 50, 99])
    x_t = q_sample(s, x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        a = s.alpha_bar[ti].item()
        assert torch.allclose(x_t[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i], atol=1e-12)
    v = v_target(s, x0, t, noise)
    assert torch.allclose(eps_from_output(s, x_t, t, v, "v"), noise, atol=1e-10)
    assert eps_from_output(s, x_t, t, noise, "eps") is noise
    assert q_sample(s, x0.float(), t, noise.float()).dtype == torch.float32


def test_q_sample_bad_input_names_argument():
    s = make_schedule(DiffusionConfig(timesteps=10))
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="noise: expected shape"):
        q_sample(s, x0, torch.tensor([1, 2]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"t: timesteps must be in \[0, 9\]"):
        q_sample(s, x0, torch.tensor([1, 10]), x0)
    with pytest.raises(ValueError, match=r"t: expected shape \[2\]"):
        q_sample(s, x0, torch.tensor([1, 2, 3]), x0)
    with pytest.raises(TypeError, match="t: expected integer"):
        s.at(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_betas(torch.tensor([0.1, 1.5]))


@pytest.mark.parametrize("loss, parameterization", [("l2", "eps"), ("l1", "eps"), ("l2", "v")])
def test_diffusion_loss_per_sample(generator, loss, parameterization):
    cfg = DiffusionConfig(timesteps=100, loss=loss, parameterization=parameterization)
    s = make_schedule(cfg)
    x0 = torch.randn(4, 2, 3, 3, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = sample_timesteps(4, 100, generator)
    target = noise if parameterization == "eps" else v_target(s, x0, t, noise)
    # A model that predicts the target exactly for sample 0 and is off by 0.5 elsewhere.
    offset = torch.tensor([0.0, 0.5, 0.5, 0.5], dtype=torch.float64).view(-1, 1, 1, 1)
    per_sample = diffusion_loss(lambda x_t, tt: target + offset, x0, t, noise, s, cfg)
    expected = 0.5 if loss == "l1" else 0.25
    assert per_sample.shape == (4,)
    assert torch.allclose(per_sample, torch.tensor([0, expected, expected, expected], dtype=per_sample.dtype))
    with pytest.raises(ValueError, match="model_fn: expected an output of shape"):
        diffusion_loss(lambda x_t, tt: x_t[:, :1], x0, t, noise, s, cfg)


def test_loss_gradient_flows(generator):
    cfg = DiffusionConfig(timesteps=10)
    w = torch.ones(1, requires_grad=True)
    x0 = torch.randn(2, 1, 2, 2, generator=generator)
    loss = diffusion_loss(lambda x, t: w * x, x0, torch.tensor([1, 5]), torch.randn(x0.shape, generator=generator),
                          make_schedule(cfg), cfg).mean()
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_sample_timesteps_follows_generator():
    a = sample_timesteps(1000, 7, torch.Generator().manual_seed(0))
    assert torch.equal(a, sample_timesteps(1000, 7, torch.Generator().manual_seed(0)))
    assert a.dtype == torch.int64 and a.min() == 0 and a.max() == 6


@pytest.mark.parametrize("data, key", [
    ({"timesteps": 1}, "timesteps"),
    ({"schedule": "sigmoid"}, "schedule"),
    ({"linear_start": 0.0}, "linear_start"),
    ({"linear_end": 1.5}, "linear_end"),
    ({"linear_start": 0.02, "linear_end": 0.01}, "linear_end"),
    ({"schedule": "cosine", "cosine_s": -0.1}, "cosine_s"),
    ({"parameterization": "x0"}, "parameterization"),
    ({"loss": "huber"}, "loss"),
    ({"steps": 10}, "steps"),
    # alpha_bar_{T-1} is 0 in float64 (the product of 1000 factors <= 0.5): samplers divide by sqrt of it
    ({"schedule": "linear", "linear_start": 0.5, "linear_end": 0.9}, "linear_end"),
    # 1.3e-88: float64 holds it, but its square root is 0 in float32, where samplers run
    ({"schedule": "linear", "timesteps": 20000}, "linear_end"),
])
def test_diffusion_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        from_dict(DiffusionConfig, data, "diffusion")
    assert err.value.key == f"diffusion.{key}"


@pytest.mark.parametrize("data, key", [
    ({"steps": 0}, "steps"), ({"steps": -5}, "steps"), ({"eta": -0.1}, "eta"),
    ({"sampler": "euler"}, "sampler"), ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"eta": 1.5}, "eta"), ({"eta": float("nan")}, "eta"), ({"sampler": "ddpm", "eta": 0.5}, "eta"),
    ({"spacing": "uniform"}, "spacing"),
])
def test_sampler_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        from_dict(SamplerConfig, data, "sampler")
    assert err.value.key == f"sampler.{key}"


def test_configs_defaults_are_valid():
    assert from_dict(DiffusionConfig, {}).beta_range() == (0.0015, 0.0155)
    assert from_dict(DiffusionConfig, {"schedule": "linear"}).beta_range() == (1e-4, 2e-2)
    assert from_dict(SamplerConfig, {"sampler": "dpmpp_2m", "steps": 25}).steps == 25
    from typing import get_args

    from sgdm.diffusion.config import Spacing
    from sgdm.diffusion.samplers import SPACINGS

    from sgdm.diffusion.samplers import DEFAULT_SPACING

    assert get_args(Spacing) == SPACINGS and SamplerConfig().spacing is None
    from sgdm.diffusion.config import SAMPLERS

    assert set(DEFAULT_SPACING) == set(SAMPLERS)
    assert from_dict(SamplerConfig, {"sampler": "dpmpp_2m", "spacing": "linspace"}).spacing == "linspace"
    assert from_dict(SamplerConfig, {"sampler": "ddim", "spacing": "logsnr"}).spacing == "logsnr"


def _count_copies_to(device_type: str, monkeypatch) -> list:
    """Records every Tensor.to that moves a CPU tensor to ``device_type``."""
    copies, to = [], torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == device_type:
            copies.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    return copies


def test_v_to_eps_off_the_cpu_reads_nothing_back_and_copies_alpha_bar_once(monkeypatch):
    # "meta" stands in for a GPU: a tensor there has no values, so any host read (int(t.min()),
    # .item(), .tolist(), .cpu()) raises, as a host sync would stall a GPU
    schedule = NoiseSchedule.from_betas(torch.linspace(1e-4, 2e-2, 50, dtype=torch.float64))
    x, v = torch.empty(3, 2, 4, 4, device="meta"), torch.empty(3, 2, 4, 4, device="meta")
    t = torch.full((3,), 17, dtype=torch.int64, device="meta")
    copies = _count_copies_to("meta", monkeypatch)
    for _ in range(4):  # four sampler steps
        eps = eps_from_output(schedule, x, t, v, "v")
        assert eps.shape == x.shape and eps.device.type == "meta"
    assert copies == [(50,)]  # alpha_bar, once for all steps


def test_at_off_the_cpu_matches_the_cpu_lookup_and_still_checks_the_range():
    schedule = NoiseSchedule.from_betas(torch.linspace(1e-4, 2e-2, 50, dtype=torch.float64))
    t = torch.tensor([0, 17, 49])
    # a second CPU device key would not exercise the device path; the range check is what differs there
    with pytest.raises(ValueError, match=r"^t: timesteps must be in \[0, 49\], got range \[0, 50\]"):
        schedule.at(torch.tensor([0, 50]))
    assert torch.equal(schedule.at(t), schedule.alpha_bar[t])
    meta = schedule.at(t.to("meta"))
    assert meta.dtype == torch.float64 and meta.shape == (3,) and meta.device.type == "meta"


@pytest.mark.cuda
def test_at_on_the_gpu_is_the_cpu_lookup_without_a_host_sync():
    schedule = NoiseSchedule.from_betas(torch.linspace(1e-4, 2e-2, 50, dtype=torch.float64))
    t = torch.tensor([0, 17, 49])
    x, v = torch.randn(3, 2, 4, 4, device="cuda"), torch.randn(3, 2, 4, 4, device="cuda")
    t_gpu = t.cuda()  # a blocking copy itself: made before the sync check
    eps_from_output(schedule, x, t_gpu, v, "v")  # the first call copies alpha_bar to the GPU
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = schedule.at(t_gpu)
        eps = eps_from_output(schedule, x, t_gpu, v, "v")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(a.cpu(), schedule.alpha_bar[t])
    assert torch.equal(eps.cpu(), _old_eps(schedule, x.cpu(), t, v.cpu()))


def _old_eps(schedule, x, t, v):
    a = schedule.alpha_bar[t]
    return a.sqrt().float().view(-1, 1, 1, 1) * v + (1 - a).sqrt().float().view(-1, 1, 1, 1) * x


@pytest.mark.parametrize("data", [
    {"schedule": "linear", "timesteps": 4000},  # alpha_bar_{T-1} = 2.7e-18: small, but samplers work
    {"schedule": "cosine", "timesteps": 4000},
    {"schedule": "scaled_linear", "timesteps": 1000, "linear_end": 0.03},
])
def test_diffusion_config_accepts_small_but_representable_alpha_bar(data):
    cfg = from_dict(DiffusionConfig, data, "diffusion")
    alpha_bar = make_schedule(cfg).alpha_bar[-1]
    assert alpha_bar > 0 and float(alpha_bar.sqrt().float()) > 0


def test_schedule_from_betas_refuses_alpha_bar_that_underflows():
    with pytest.raises(ValueError, match="betas: alpha_bar at the last timestep is 0 "):
        NoiseSchedule.from_betas(torch.full((1000,), 0.6, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_make_betas_without_a_range_takes_the_schedules_default(kind):
    from sgdm.diffusion.config import DEFAULT_BETA_RANGE
    from sgdm.diffusion.schedule import make_betas

    assert torch.equal(make_betas(kind, 10), make_betas(kind, 10, *DEFAULT_BETA_RANGE[kind]))
