"""ClassifierFreeGuidance checks its w once, for every sampler (ddpm and dpmpp_2m mixed a NaN
or infinite w into NaN samples without a word; ddim's fused op said "must lie in [-inf, inf], got inf")."""
import math

import pytest
import torch

from sgdm.diffusion.config import DiffusionConfig
from sgdm.diffusion.guidance import ClassifierFreeGuidance
from sgdm.diffusion.samplers import ddim_timesteps, get_sampler
from sgdm.diffusion.schedule import make_schedule


def _model(x, t, cond, cond_map):
    return 0.1 * x + (0.0 if cond is None else cond.sum(1, keepdim=True))


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "2", None, True, [1.0, 2.0],
                                   torch.tensor([1.0, 2.0])])
def test_a_scale_that_is_no_finite_number_is_refused_by_name(scale):
    with pytest.raises(ValueError, match=r"^scale: expected a finite number w \(Eq. 4"):
        ClassifierFreeGuidance(_model, torch.ones(3, 2), None, scale)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp_2m"])
def test_no_sampler_turns_a_nan_scale_into_nan_samples(name):
    s = make_schedule(DiffusionConfig(timesteps=100))
    with pytest.raises(ValueError, match="^scale"):
        get_sampler(name)(ClassifierFreeGuidance(_model, torch.ones(3, 2), None, math.nan), torch.randn(3, 2),
                          ddim_timesteps(5, 100), s)


@pytest.mark.parametrize("scale", [0, 2, 2.5, -1.0, torch.tensor(3.0)])
def test_finite_real_scales_are_kept_as_floats(scale):
    g = ClassifierFreeGuidance(_model, torch.ones(3, 2), None, scale)
    assert type(g.scale) is float and g.scale == float(scale)


@pytest.mark.parametrize("scale", [2.0, 1.0, 0.0])
@pytest.mark.parametrize("which", ["cond", "cond_map"])
def test_a_condition_for_another_batch_size_is_named_with_both_sizes(scale, which):
    """The guided pass doubles the batch, so the network's own check said "cond: expected shape [6, 3]"
    for a [2, 3] condition and 3 images; any other network would see a mismatch it cannot explain."""
    seen = []
    model = lambda x, t, c, cm: seen.append(x.shape[0]) or x  # noqa: E731
    conds = {"cond": torch.ones(2, 3), "cond_map": torch.ones(2, 1, 4, 4)}
    guided = ClassifierFreeGuidance(model, **{which: conds[which]}, scale=scale)
    with pytest.raises(ValueError, match=rf"^{which}: batch size 2 differs from x_t's 3"):
        guided(torch.zeros(3, 2, 4, 4), torch.zeros(3, dtype=torch.long))
    assert not seen
