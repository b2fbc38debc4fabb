"""sample_ddim's eta is DDIM's interpolation between the deterministic sampler (0) and DDPM's
posterior variance (1). Past 1, sigma_t^2 exceeds 1 - a_prev on large steps: the fused op then clamps the
direction term sqrt(1 - a_prev - sigma_t^2) to 0 and the samples come out too wide, without a word
(LDM's DDIM takes the square root of the negative number and returns NaN)."""
import math

import pytest
import torch

from sgdm.diffusion.config import DiffusionConfig
from sgdm.diffusion.samplers import ddim_timesteps, sample_ddim
from sgdm.diffusion.schedule import make_schedule
from tests.diffusion import gmm


@pytest.fixture(scope="module")
def schedule():
    return make_schedule(DiffusionConfig(schedule="linear", timesteps=1000))


@pytest.mark.parametrize("eta", [1.5, 5.0, math.inf, math.nan])
def test_an_eta_past_ddpms_variance_is_refused(schedule, eta):
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^eta: must be a finite number in \[0, 1\]"):
        sample_ddim(gmm.make_denoiser(schedule), x, ddim_timesteps(10, 1000), schedule,
                    generator=torch.Generator().manual_seed(1), eta=eta)


def test_eta_one_is_still_taken(schedule):
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample_ddim(gmm.make_denoiser(schedule), x, ddim_timesteps(10, 1000), schedule,
                      generator=torch.Generator().manual_seed(1), eta=1)
    assert out.shape == (4, 2) and bool(out.isfinite().all())
