"""The pipeline's latents against a float64 reference written out by hand from the papers:
paper Eq. 4 guidance with the all-zero null condition, v -> eps, DDIM (Song et al. Eq. 12, eta > 0 with
the images' own generators), the DDPM posterior, DPM-Solver++(2M), the last step to alpha_bar = 1."""
import math

import pytest
import torch

from sgdm.pipeline import per_image_generators
from tests.pipeline.helpers import K, tiny_pipeline

CLUSTERS, W, STEPS = [0, 1, 2], 2.5, 5


def _noise(gens, shape):
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).double()


def _reference(pipe, sampler, eta, spacing, seed):
    a_bar, shape = pipe.schedule.alpha_bar, pipe.latent_shape
    gens = per_image_generators(torch.Generator().manual_seed(seed), len(CLUSTERS))
    x = _noise(gens, shape)
    cond = torch.nn.functional.one_hot(torch.tensor(CLUSTERS), K).double()
    ts = pipe.timesteps(STEPS, spacing).tolist()
    lam = lambda a: 0.5 * math.log(a / (1 - a))  # noqa: E731
    last_x0 = last_h = None
    for i, t in enumerate(ts):
        a, a_prev = a_bar[t].item(), a_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        tt = torch.full((len(CLUSTERS),), t)
        out = (1 - W) * pipe.unet(x, tt, torch.zeros_like(cond), None) + W * pipe.unet(x, tt, cond, None)
        eps = out if pipe.diffusion.parameterization == "eps" else math.sqrt(a) * out + math.sqrt(1 - a) * x
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if sampler == "ddim":
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
            z = _noise(gens, shape) if eta > 0 and a_prev < 1 else 0.0
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps + sigma * z
        elif sampler == "ddpm":
            beta = 1 - a / a_prev
            x = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x
            if a_prev < 1:
                x = x + math.sqrt(beta * (1 - a_prev) / (1 - a)) * _noise(gens, shape)
        elif a_prev == 1.0:  # dpmpp_2m: lambda = inf, x0_pred
            x = x0
        else:
            h = lam(a_prev) - lam(a)
            d = x0 if last_x0 is None else (1 + 1 / (2 * last_h / h)) * x0 - 1 / (2 * last_h / h) * last_x0
            x = math.sqrt((1 - a_prev) / (1 - a)) * x - math.sqrt(a_prev) * math.expm1(-h) * d
            last_x0, last_h = x0, h
    return x


@pytest.fixture(scope="module")
def pipes():
    return {p: tiny_pipeline("label", p).to(dtype=torch.float64) for p in ("eps", "v")}


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("sampler, eta, spacing", [
    ("ddim", 0.0, "linspace"), ("ddim", 0.7, "leading"), ("ddpm", 0.0, "trailing"), ("dpmpp_2m", 0.0, "logsnr"),
])
@torch.no_grad()
def test_guided_latents_match_a_float64_reference(pipes, parameterization, sampler, eta, spacing):
    pipe = pipes[parameterization]
    got = pipe(len(CLUSTERS), cluster=CLUSTERS, guidance_scale=W, num_steps=STEPS, sampler=sampler, eta=eta,
               spacing=spacing, generator=torch.Generator().manual_seed(5), output_type="latent", progress=False)
    want = _reference(pipe, sampler, eta, spacing, 5)
    assert want.abs().max() > 1.0  # the latents are not trivially small
    torch.testing.assert_close(got, want.float(), atol=2e-6, rtol=1e-6)
