"""Classifier-free guidance: paper Eq. 4, one batched network call, fused DDIM path."""
import pytest
import torch

from sgdm.diffusion.config import DiffusionConfig
from sgdm.diffusion.guidance import ClassifierFreeGuidance, GuidedEps, guided_eps, resolve_eps
from sgdm.diffusion.samplers import ddim_timesteps, get_sampler, logsnr_timesteps, sample_ddim
from sgdm.diffusion.schedule import make_schedule
from tests.diffusion import gmm


class CountingModel:
    """eps = x * 0.5 + (sum of cond) + (mean of cond_map); records each call's batch size."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond, cond_map):
        self.calls.append(x.shape[0])
        out = 0.5 * x + t.view(-1, 1, 1, 1).to(x.dtype) * 1e-3
        if cond is not None:
            out = out + cond.sum(1).view(-1, 1, 1, 1)
        if cond_map is not None:
            out = out + cond_map.mean((1, 2, 3)).view(-1, 1, 1, 1)
        return out


@pytest.fixture
def inputs(generator):
    x = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    cond = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), 3).double()
    cond_map = torch.rand(3, 1, 8, 8, generator=generator, dtype=torch.float64)
    return x, torch.tensor([5, 5, 5]), cond, cond_map


def test_eq4_endpoints_and_other_convention(generator):
    ec, eu = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    assert torch.equal(guided_eps(ec, eu, 0.0), eu)
    assert torch.equal(guided_eps(ec, eu, 1.0), ec)
    for s in (0.5, 2.0, 7.5):
        assert torch.allclose(guided_eps(ec, eu, s), eu + s * (ec - eu), atol=1e-14)


def test_wrapper_batches_both_halves_in_one_call(inputs):
    x, t, cond, cond_map = inputs
    model = CountingModel()
    out = ClassifierFreeGuidance(model, cond, cond_map, scale=3.0)(x, t)
    assert model.calls == [6]
    assert isinstance(out, GuidedEps) and out.scale == 3.0
    assert torch.allclose(out.cond, CountingModel()(x, t, cond, cond_map))
    assert torch.allclose(out.uncond, CountingModel()(x, t, torch.zeros_like(cond), torch.zeros_like(cond_map)))
    assert torch.allclose(resolve_eps(out), guided_eps(out.cond, out.uncond, 3.0))


def test_w0_is_unconditional_and_w1_conditional(inputs):
    x, t, cond, cond_map = inputs
    model = CountingModel()
    cond_eps = model(x, t, cond, cond_map)
    uncond_eps = model(x, t, torch.zeros_like(cond), torch.zeros_like(cond_map))
    assert torch.allclose(resolve_eps(ClassifierFreeGuidance(model, cond, cond_map, 0.0)(x, t)), uncond_eps)
    assert torch.allclose(resolve_eps(ClassifierFreeGuidance(model, cond, cond_map, 1.0)(x, t)), cond_eps)
    # the batched path agrees at the endpoints too
    both = ClassifierFreeGuidance(model, cond, cond_map, 0.5)(x, t)
    assert torch.allclose(GuidedEps(both.cond, both.uncond, 0.0).mix(), uncond_eps)
    assert torch.allclose(GuidedEps(both.cond, both.uncond, 1.0).mix(), cond_eps)


def test_no_condition_calls_the_model_once_unconditionally(inputs):
    x, t, _, _ = inputs
    model = CountingModel()
    out = ClassifierFreeGuidance(model, None, None, 5.0)(x, t)
    assert model.calls == [3] and torch.allclose(out, 0.5 * x + 5e-3)


def test_mismatched_condition_batches_are_rejected(inputs):
    _, _, cond, cond_map = inputs
    with pytest.raises(ValueError, match="cond_map: batch size 2"):
        ClassifierFreeGuidance(CountingModel(), cond, cond_map[:2], 2.0)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_ddim_path_equals_mixing_first(inputs, dtype, atol):
    x, _, cond, cond_map = (v.to(dtype) if v.is_floating_point() else v for v in inputs)
    s = make_schedule(DiffusionConfig(timesteps=100))
    guided = ClassifierFreeGuidance(CountingModel(), cond, cond_map, 2.5)
    ts = ddim_timesteps(10, 100)
    fused = sample_ddim(guided, x.clone(), ts, s, eta=0.5, generator=torch.Generator().manual_seed(1))
    mixed = sample_ddim(lambda xx, tt: resolve_eps(guided(xx, tt)), x.clone(), ts, s, eta=0.5,
                        generator=torch.Generator().manual_seed(1))
    assert fused.dtype == dtype and torch.allclose(fused, mixed, atol=atol)


@pytest.mark.parametrize("name, steps", [("ddim", 50), ("dpmpp_2m", 20)])
def test_guided_sampling_of_the_mixture(name, steps):
    """w = 1 with component k's one-hot samples component k; w = 0 the whole mixture."""
    s = make_schedule(DiffusionConfig(schedule="linear", timesteps=1000))
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    cond = torch.zeros(2000, 2, dtype=torch.float64)
    cond[:, 0] = 1.0
    ts = logsnr_timesteps(steps, s) if name == "dpmpp_2m" else ddim_timesteps(steps, 1000)
    run = lambda w: get_sampler(name)(ClassifierFreeGuidance(gmm.make_eps_model(s), cond, None, w), x_T.clone(), ts, s)
    conditional = run(1.0)
    assert torch.allclose(conditional.mean(0), gmm.MEANS[0], atol=0.05)
    assert torch.allclose(torch.cov(conditional.T), gmm.COVS[0], atol=0.05)
    assert torch.allclose(gmm.component_fractions(run(0.0)), gmm.WEIGHTS, atol=0.03)
    # w > 1 extrapolates away from the mixture: still component 0, tighter than w = 1
    strong = run(3.0)
    assert gmm.component_fractions(strong)[0] > 0.99
