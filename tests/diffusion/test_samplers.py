"""Samplers recover a Gaussian mixture from its exact denoiser; determinism; bad input."""
import pytest
import torch

from sgdm.diffusion.config import DiffusionConfig
from sgdm.diffusion.samplers import (DEFAULT_SPACING, LAMBDA_MIN_CLIPPED, SAMPLERS, SPACINGS, ddim_timesteps,
                                     get_sampler, logsnr_timesteps, sample_ddim, sample_ddpm, sample_dpmpp_2m,
                                     sampling_timesteps)
from sgdm.diffusion.schedule import make_schedule
from tests.diffusion import gmm

N = 4000


@pytest.fixture(scope="module")
def schedule():
    return make_schedule(DiffusionConfig(schedule="linear", timesteps=1000))


def _check_recovers_mixture(x):
    mean, cov = gmm.mixture_moments()
    assert torch.allclose(x.mean(0), mean, atol=0.08), (x.mean(0), mean)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.15), (torch.cov(x.T), cov)
    assert torch.allclose(gmm.component_fractions(x), gmm.WEIGHTS, atol=0.03)


@pytest.mark.parametrize("kind, name, steps, kwargs", [
    ("linear", "ddim", 100, {}),
    ("linear", "ddpm", 200, {}),
    ("linear", "dpmpp_2m", 20, {}),
    ("cosine", "dpmpp_2m", 20, {}),
    ("scaled_linear", "ddim", 100, {"eta": 0.5}),
])
def test_sampler_recovers_gaussian_mixture(schedule, kind, name, steps, kwargs):
    if kind != "linear":
        schedule = make_schedule(DiffusionConfig(schedule=kind, timesteps=1000))
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(N, 2, generator=g, dtype=torch.float64)
    ts = ddim_timesteps(steps, 1000)
    if name == "dpmpp_2m":
        ts = logsnr_timesteps(steps, schedule)
    else:
        kwargs = dict(kwargs, generator=g)
    x = get_sampler(name)(gmm.make_denoiser(schedule), x_T, ts, schedule, **kwargs)
    assert x.dtype == torch.float64 and x.shape == (N, 2)
    _check_recovers_mixture(x)


def test_wrong_denoiser_fails_the_moment_check(schedule):
    # The check above must be able to fail: a denoiser for a shifted mixture does.
    shifted = gmm.make_denoiser(schedule, means=gmm.MEANS + 0.5)
    x_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = sample_ddim(shifted, x_T, ddim_timesteps(50, 1000), schedule)
    with pytest.raises(AssertionError):
        _check_recovers_mixture(x)


def test_ddim_eta0_is_deterministic_and_draws_no_noise(schedule):
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = ddim_timesteps(20, 1000)
    state = torch.random.get_rng_state()
    a = sample_ddim(gmm.make_denoiser(schedule), x_T.clone(), ts, schedule)
    b = sample_ddim(gmm.make_denoiser(schedule), x_T.clone(), ts, schedule, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_ddim_with_eta1_is_ddpm_ancestral_sampling(schedule):
    # sigma_t at eta = 1 is the DDPM posterior std, and the DDIM mean equals the posterior mean.
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    run = lambda f, **kw: f(gmm.make_denoiser(schedule), x_T.clone(), ddim_timesteps(25, 1000), schedule,
                            generator=torch.Generator().manual_seed(4), **kw)
    assert torch.allclose(run(sample_ddim, eta=1.0), run(sample_ddpm), atol=1e-10)
    assert not torch.allclose(run(sample_ddim, eta=0.5), run(sample_ddpm), atol=1e-3)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_stochastic_samplers_follow_the_generator(schedule, name):
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = {"eta": 1.0} if name == "ddim" else {}
    run = lambda seed: get_sampler(name)(gmm.make_denoiser(schedule), x_T.clone(), ddim_timesteps(10, 1000),
                                         schedule, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_per_sample_generators_make_samples_independent_of_batching(schedule, name):
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    kw = {"eta": 0.7} if name == "ddim" else {}
    sampler, ts, den = get_sampler(name), ddim_timesteps(10, 1000), gmm.make_denoiser(schedule)
    whole = sampler(den, x_T.clone(), ts, schedule, generator=gens(range(6)), **kw)
    parts = [sampler(den, x_T[i:i + 2].clone(), ts, schedule, generator=gens(range(i, i + 2)), **kw)
             for i in (0, 2, 4)]
    assert torch.allclose(whole, torch.cat(parts), atol=1e-12)


def test_callback_sees_every_step(schedule):
    seen = []
    ts = ddim_timesteps(5, 1000)
    out = sample_dpmpp_2m(gmm.make_denoiser(schedule), torch.zeros(3, 2, dtype=torch.float64), ts, schedule,
                          callback=lambda i, t, x, x0: seen.append((i, t, x.shape, x0.shape)))
    assert [s[:2] for s in seen] == list(enumerate(ts.tolist()))
    assert out.shape == (3, 2)


def test_ddim_timesteps_spacings():
    # leading: LDM's ddim_discretize, kept exactly
    assert ddim_timesteps(250, 1000, "leading").tolist() == list(range(997, 0, -4))
    assert ddim_timesteps(1, 1000, "leading").tolist() == [1]
    assert ddim_timesteps(600, 1000, "leading")[0] == 600  # why it is not the default
    # linspace (default): from T - 1 down to 1, whatever the count
    assert ddim_timesteps(1, 1000).tolist() == [999]
    assert ddim_timesteps(3, 1000).tolist() == [999, 500, 1]
    assert ddim_timesteps(250, 1000)[:3].tolist() == [999, 995, 991]
    # trailing: from T - 1 in steps of T / n
    assert ddim_timesteps(4, 1000, "trailing").tolist() == [999, 749, 499, 249]
    for spacing in ("linspace", "leading", "trailing"):
        assert ddim_timesteps(1000, 1000, spacing).tolist() == list(range(999, -1, -1))
        for T in (2, 3, 10, 1000):
            for n in range(1, T + 1):
                ts = ddim_timesteps(n, T, spacing)
                assert len(ts) == n and ts.max() <= T - 1 and ts.min() >= 0 and bool((ts[1:] < ts[:-1]).all())
                if spacing != "leading":
                    assert ts[0] == T - 1
    with pytest.raises(ValueError, match="spacing: unknown value 'uniform'"):
        ddim_timesteps(10, 1000, "uniform")
    with pytest.raises(ValueError, match="spacing: 'logsnr' depends on the noise schedule"):
        ddim_timesteps(10, 1000, "logsnr")


@pytest.mark.parametrize("kind", ["scaled_linear", "cosine"])
def test_every_sampler_runs_on_every_spacing(kind):
    """sampling_timesteps dispatches each spacing; each sampler accepts any of them, and DEFAULT_SPACING
    names the better grid for DPM-Solver++ on LDM's schedule (log-SNR), where it is also measured."""
    schedule = make_schedule(DiffusionConfig(schedule=kind))
    assert sampling_timesteps(20, schedule, "logsnr").tolist() == logsnr_timesteps(20, schedule).tolist()
    for spacing in ("linspace", "leading", "trailing"):
        assert sampling_timesteps(20, schedule, spacing).tolist() == ddim_timesteps(20, 1000, spacing).tolist()
    assert DEFAULT_SPACING == {"ddim": "linspace", "ddpm": "linspace", "dpmpp_2m": "logsnr"}
    x_t = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for spacing in SPACINGS:
        ts = sampling_timesteps(6, schedule, spacing)
        for name in SAMPLERS:
            kwargs = {} if name == "dpmpp_2m" else {"generator": torch.Generator().manual_seed(1)}
            out = get_sampler(name)(gmm.make_denoiser(schedule), x_t, ts, schedule, **kwargs)
            assert out.shape == x_t.shape and bool(torch.isfinite(out).all()), (name, spacing)


def test_default_spacing_recovers_the_mixture_at_every_step_count():
    """LDM's leading spacing starts at t = n for n in (T/2, T) (and at t = 1 for n = 1), where x_T
    is not pure noise yet; the default starts at T - 1 for every n."""
    schedule = make_schedule(DiffusionConfig(schedule="cosine", timesteps=1000))
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(N, 2, generator=g, dtype=torch.float64)
    run = lambda ts: sample_ddim(gmm.make_denoiser(schedule), x_T.clone(), ts, schedule)  # noqa: E731
    _check_recovers_mixture(run(ddim_timesteps(501, 1000)))
    with pytest.raises(AssertionError):
        _check_recovers_mixture(run(ddim_timesteps(501, 1000, "leading")))


def test_logsnr_timesteps_skip_the_cosine_schedules_empty_end():
    """The cosine schedule's last beta is clamped, so lambda drops by 3 over its last timestep; an
    even grid from there spent 8 of 20 steps at t >= 992. The grid now starts at lambda = -5.1."""
    cosine = make_schedule(DiffusionConfig(schedule="cosine", timesteps=1000))
    ts = logsnr_timesteps(20, cosine)
    lam = 0.5 * (cosine.alpha_bar / (1 - cosine.alpha_bar)).log()
    assert int((ts >= 992).sum()) <= 2 and abs(float(lam[ts[0]]) - LAMBDA_MIN_CLIPPED) < 0.05
    scaled = make_schedule(DiffusionConfig(schedule="scaled_linear", timesteps=1000))
    assert logsnr_timesteps(20, scaled)[0] == 999  # its lambda_{T-1} is above the clip: unchanged


def test_logsnr_timesteps_are_even_in_lambda_and_distinct(schedule):
    ts = logsnr_timesteps(20, schedule)
    lam = 0.5 * (schedule.alpha_bar / (1 - schedule.alpha_bar)).log()[ts]
    assert ts[0] == 999 and ts[-1] == 1 and len(ts) == 20
    gaps = lam[1:] - lam[:-1]
    assert gaps.min() > 0 and (gaps - gaps.mean()).abs().max() < 0.25 * gaps.mean()  # integer t rounds
    for n in (1, 250, 999, 1000):
        ts = logsnr_timesteps(n, schedule)
        assert len(ts) == n and ts.max() <= 999 and ts.min() >= 0 and bool((ts[1:] < ts[:-1]).all())
    with pytest.raises(ValueError, match="num_steps"):
        logsnr_timesteps(0, schedule)


@pytest.mark.parametrize("steps, match", [(0, "num_steps"), (-3, "num_steps"), (1001, "num_steps"),
                                          (2.5, "num_steps")])
def test_bad_step_counts_name_the_argument(steps, match):
    with pytest.raises(ValueError, match=match):
        ddim_timesteps(steps, 1000)


def test_bad_spacing_and_sampler_name_the_argument():
    with pytest.raises(ValueError, match="spacing.*'quadratic'"):
        ddim_timesteps(10, 1000, spacing="quadratic")
    with pytest.raises(ValueError, match="sampler.*'euler'"):
        get_sampler("euler")


def test_bad_timesteps_and_generators_name_the_argument(schedule):
    den = gmm.make_denoiser(schedule)
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="timesteps.*decreasing"):
        sample_ddim(den, x, torch.tensor([1, 5, 9]), schedule)
    with pytest.raises(ValueError, match="timesteps: empty"):
        sample_ddpm(den, x, torch.tensor([], dtype=torch.int64), schedule)
    with pytest.raises(ValueError, match=r"t: timesteps must be in \[0, 999\]"):
        sample_ddim(den, x, torch.tensor([1000, 5]), schedule)
    with pytest.raises(ValueError, match="generator: got a list of 3 generators for a batch of 2"):
        sample_ddpm(den, x, ddim_timesteps(3, 1000), schedule, generator=[torch.Generator()] * 3)
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(den, x, ddim_timesteps(3, 1000), schedule, eta=-1.0)
