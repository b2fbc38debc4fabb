"""Samplers: small pure functions over a denoiser callable.

Every sampler has the form ``sample_X(denoise, x, timesteps, schedule, ...) -> x_0``:

- ``denoise(x_t [B, C, h, w], t [B] int64) -> eps`` or a
  :class:`~sgdm.diffusion.guidance.GuidedEps` (cond and uncond halves plus w,
  from :class:`~sgdm.diffusion.guidance.ClassifierFreeGuidance`);
- ``x``: the starting noise x_T [B, C, h, w] (the caller draws it, see
  :func:`sgdm.diffusion.noise.randn`);
- ``timesteps``: descending training timesteps to visit, e.g. from
  :func:`ddim_timesteps`; after the last one the sampler steps to clean data
  (alpha_bar = 1);
- ``generator`` (ddim and ddpm; dpmpp_2m draws no noise and takes none): None, a
  ``torch.Generator`` or one generator per sample;
- ``callback(i, t, x, x0_pred)``: called after every step.

Notation: a_t = alpha_bar_t, x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterator, Optional, Union

import torch

from sgdm import ops
from sgdm.diffusion.guidance import GuidedEps, resolve_eps
from sgdm.diffusion.noise import Generators, randn_like
from sgdm.diffusion.schedule import NoiseSchedule

__all__ = ["SPACINGS", "DEFAULT_SPACING", "LAMBDA_MIN_CLIPPED", "ddim_timesteps", "logsnr_timesteps", "sampling_timesteps",
           "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "get_sampler", "SAMPLERS", "Denoiser", "Callback"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], Union[torch.Tensor, GuidedEps]]
Callback = Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]]


# linspace, leading, trailing: ddim_timesteps; logsnr: logsnr_timesteps
SPACINGS = ("linspace", "leading", "trailing", "logsnr")
# each sampler's spacing when none is chosen: DPM-Solver++ is a solver in lambda (log-SNR), and on
# LDM's scaled_linear schedule its log-SNR grid has 1.8x lower error than linspace at 20 steps
# (benchmarks/sampler_bench.py); on the cosine schedule linspace is better (RESULTS.md), so both
# can be chosen for either sampler
DEFAULT_SPACING = {"ddim": "linspace", "ddpm": "linspace", "dpmpp_2m": "logsnr"}

# Lower end of the lambda range that logsnr_timesteps spaces over (lambda = log(alpha / sigma)):
# the cosine schedule's clamped last beta puts lambda_{T-1} near -9.8 while lambda_{T-2} is near
# -6.5, so an even grid from lambda_{T-1} spends a third of a short budget on t >= 992, where
# the latents hold no signal. DPM-Solver's implementations clip there for that schedule
# (alpha_bar = 3.7e-5); linear and scaled-linear schedules end above it and are unaffected.
LAMBDA_MIN_CLIPPED = -5.1


def _check_num_steps(num_steps, num_train_timesteps: int) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps: must be a positive integer, got {num_steps!r}")
    if num_steps > num_train_timesteps:
        raise ValueError(f"num_steps: at most the number of training timesteps ({num_train_timesteps}), "
                         f"got {num_steps}")
    return int(num_steps)


def ddim_timesteps(num_steps: int, num_train_timesteps: int, spacing: str = "linspace") -> torch.Tensor:
    """The ``num_steps`` training timesteps a sampler visits, descending, int64; exactly
    ``num_steps`` distinct values (T = ``num_train_timesteps``, n = ``num_steps``).

    - ``linspace`` (default): n evenly spaced values from T - 1 down to 1, rounded (n = 1:
      [T - 1]; n = T: T - 1 .. 0). Sampling starts from pure noise, which is x_t's marginal at
      t = T - 1 only, and the last step leaves from t = 1, where little noise is left.
    - ``leading``: LDM's ``ddim_discretize``, every c = T // n-th step shifted by one
      (t = 1, 1 + c, ...; the shift is dropped when it would pass T - 1). It starts at
      T - c + 1 at best, and far lower where c = T // n truncates: n = 1 is [1] (the output is
      the input noise), n = 3 starts at 667 and n = 600 at 600. LDM's timesteps (250 of 1000
      steps: 997, 993, ..., 1) where n divides T (else LDM's range(0, T, c) has more than n values).
      Their last step differs: LDM's DDIM steps from t = 1 to alpha_bar_0 (its ``alphas_prev[0]``),
      leaving sqrt(1 - alpha_bar_0) eps (0.039 eps on LDM's default schedule) in the sample; every
      sampler here steps to alpha_bar = 1 and returns x0_pred.
    - ``trailing``: t_i = round(T - i T / n) - 1 (Lin et al. 2024, "Common diffusion noise
      schedules and sample steps are flawed"): starts at T - 1, but its last step leaves from
      t = T / n - 1 (t = 19 at n = 50), a coarse final denoising step.
    """
    n, T = _check_num_steps(num_steps, num_train_timesteps), num_train_timesteps
    if spacing == "linspace":
        if n == T:
            return torch.arange(T - 1, -1, -1, dtype=torch.int64)
        if n == 1:
            return torch.tensor([T - 1], dtype=torch.int64)
        # the stride (T - 2) / (n - 1) >= 1 for n < T, so rounding keeps the values distinct
        return torch.linspace(T - 1, 1, n, dtype=torch.float64).round().to(torch.int64)
    if spacing == "leading":
        c = T // n
        offset = 1 if (n - 1) * c + 1 <= T - 1 else 0
        return (torch.arange(n, dtype=torch.int64) * c + offset).flip(0)
    if spacing == "trailing":
        return (torch.arange(n, 0, -1, dtype=torch.float64) * (T / n)).round().to(torch.int64) - 1
    if spacing == "logsnr":
        raise ValueError("spacing: 'logsnr' depends on the noise schedule; use logsnr_timesteps or sampling_timesteps")
    raise ValueError(f"spacing: unknown value {spacing!r} (expected one of {', '.join(SPACINGS)})")


def logsnr_timesteps(num_steps: int, schedule: NoiseSchedule) -> torch.Tensor:
    """``num_steps`` descending timesteps evenly spaced in lambda_t = log(sqrt(a_t) / sqrt(1 - a_t)),
    down to t = 1 (Lu et al. 2022 recommend this for DPM-Solver; at 20 steps it avoids the large
    2nd-order extrapolation that uniform spacing makes on the final steps). The grid starts at
    t = T - 1 or, where lambda_{T-1} lies below :data:`LAMBDA_MIN_CLIPPED` (the cosine schedule),
    at the last timestep above it. Where several targets round to one timestep they are pushed
    apart to stay distinct.
    """
    T = len(schedule)
    num_steps = _check_num_steps(num_steps, T)
    lam = 0.5 * (schedule.alpha_bar.log() - (1 - schedule.alpha_bar).log())
    low = 1 if num_steps < T else 0
    top = max(float(lam[-1]), min(LAMBDA_MIN_CLIPPED, float(lam[low])))
    targets = torch.linspace(top, float(lam[low]), num_steps, dtype=torch.float64)
    ts = (lam[None, :] - targets[:, None]).abs().argmin(1).tolist()  # descending t
    for j in range(num_steps - 2, -1, -1):
        ts[j] = max(ts[j], ts[j + 1] + 1)
    # min of two strictly decreasing sequences stays strictly decreasing, and now ends <= T - 1
    return torch.tensor([min(t, T - 1 - j) for j, t in enumerate(ts)], dtype=torch.int64)


def sampling_timesteps(num_steps: int, schedule: NoiseSchedule, spacing: str) -> torch.Tensor:
    """The ``num_steps`` descending timesteps of ``spacing`` (one of :data:`SPACINGS`) on ``schedule``:
    ``logsnr`` from :func:`logsnr_timesteps`, the others from :func:`ddim_timesteps`. Any sampler
    runs on any of them; :data:`DEFAULT_SPACING` is each one's default."""
    if spacing == "logsnr":
        return logsnr_timesteps(num_steps, schedule)
    return ddim_timesteps(num_steps, len(schedule), spacing)


def _steps(timesteps: torch.Tensor, schedule: NoiseSchedule) -> Iterator[tuple[int, int, float, float]]:
    """(i, t, a_t, a_prev) per step as Python floats (float64); a_prev = 1 after the last timestep."""
    ts = [int(t) for t in torch.as_tensor(timesteps).flatten()]
    if not ts:
        raise ValueError("timesteps: empty; a sampler needs at least one step")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps: must be strictly decreasing, got {ts[:8]}{'...' if len(ts) > 8 else ''}")
    alpha_bar = schedule.at(torch.tensor(ts)).tolist()
    for i, (t, a_t) in enumerate(zip(ts, alpha_bar)):
        yield i, t, a_t, alpha_bar[i + 1] if i + 1 < len(ts) else 1.0


def _t_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)


def sample_ddim(denoise: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule,
                generator: Generators = None, eta: float = 0.0, callback: Callback = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12), each update one ``sgdm.ops.guided_ddim_step``:

        x_prev = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z,
        sigma_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev),  z ~ N(0, I).

    eta in [0, 1]: 0 is deterministic (the paper's 250-step sampler); 1 matches
    DDPM's posterior variance. A guided denoiser's halves go into the fused op,
    which forms eps = (1 - w) eps_uncond + w eps_cond (paper Eq. 4) itself.

    Returns x_0 [B, C, h, w] in x's dtype and device. ``generator`` (module docstring) draws
    sigma_t z only when eta > 0; None draws from torch's global generator.
    """
    # past 1, sigma_t^2 > 1 - a_prev on large steps: no DDIM process has that variance
    if not (math.isfinite(eta) and 0 <= eta <= 1):
        raise ValueError(f"eta: must be a finite number in [0, 1] (0: deterministic, 1: DDPM's variance), got {eta}")
    for i, t, a_t, a_prev in _steps(timesteps, schedule):
        out = denoise(x, _t_batch(t, x))
        noise = randn_like(x, generator) if eta > 0 and a_prev < 1.0 else None
        if isinstance(out, GuidedEps):
            x, x0 = ops.guided_ddim_step(x, out.cond, a_t, a_prev, eps_uncond=out.uncond,
                                         guidance_scale=out.scale, eta=eta, noise=noise)
        else:
            x, x0 = ops.guided_ddim_step(x, out, a_t, a_prev, eta=eta, noise=noise)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_ddpm(denoise: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule,
                generator: Generators = None, callback: Callback = None) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0_pred) (Ho et al. 2020, Eq. 6-7),
    over any decreasing subset of timesteps (respaced betas, beta' = 1 - a_t / a_prev):

        mean = sqrt(a_prev) beta' / (1 - a_t) x0_pred + sqrt(1 - beta') (1 - a_prev) / (1 - a_t) x_t,
        var  = beta' (1 - a_prev) / (1 - a_t)   ("fixed small" variance).

    Returns x_0 [B, C, h, w] in x's dtype and device; every step but the last draws noise from
    ``generator`` (None: torch's global generator).
    """
    for i, t, a_t, a_prev in _steps(timesteps, schedule):
        eps = resolve_eps(denoise(x, _t_batch(t, x)))
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        beta = 1 - a_t / a_prev
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
        if a_prev < 1.0:
            x = mean + math.sqrt(beta * (1 - a_prev) / (1 - a_t)) * randn_like(x, generator)
        else:
            x = mean
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule,
                    callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep 2nd order in data prediction.

    With alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t), lambda_t = log(alpha_t / sigma_t),
    h_i = lambda_{t_i} - lambda_{t_{i-1}} and D_i = x0_pred at t_{i-1}:

        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D~_i,
        D~_i = (1 + 1 / (2 r_i)) D_i - 1 / (2 r_i) D_{i-1},  r_i = h_{i-1} / h_i

    (D~_1 = D_1: first order on the first step). The last step, to alpha_bar = 1
    (lambda = inf), returns x0_pred, as the first-order update does in that limit.
    Deterministic: draws no noise, so it takes no ``generator``.

    Returns x_0 [B, C, h, w] in x's dtype and device.
    """
    x0_last, h_last = None, None
    for i, t, a_t, a_next in _steps(timesteps, schedule):
        eps = resolve_eps(denoise(x, _t_batch(t, x)))
        alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1 - a_t)
        x0 = (x - sigma_t * eps) / alpha_t
        if a_next >= 1.0:
            x = x0
        else:
            alpha_n, sigma_n = math.sqrt(a_next), math.sqrt(1 - a_next)
            h = math.log(alpha_n / sigma_n) - math.log(alpha_t / sigma_t)
            d = x0
            if x0_last is not None:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_last
            x = (sigma_n / sigma_t) * x - (alpha_n * math.expm1(-h)) * d
            x0_last, h_last = x0, h
        if callback is not None:
            callback(i, t, x, x0)
    return x


SAMPLERS = {"ddim": sample_ddim, "ddpm": sample_ddpm, "dpmpp_2m": sample_dpmpp_2m}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function called ``name`` (ddim, ddpm or dpmpp_2m)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {name!r} (expected one of {', '.join(SAMPLERS)})")
    return SAMPLERS[name]
