"""Typed configuration of the diffusion process and of the sampler.

Light imports only (no torch) so that configs validate quickly at the entry
point. ``DiffusionConfig`` describes training-time maths (noise schedule,
what the network predicts, the loss); ``SamplerConfig`` the defaults used to
draw samples (which solver, how many steps, eta, guidance scale w).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from sgdm.config.core import ConfigError

# Per-schedule (linear_start, linear_end) used when the config leaves them out:
# DDPM's betas 1e-4..2e-2, and LDM's default 0.0015..0.0155 (linear in sqrt(beta)).
DEFAULT_BETA_RANGE = {"linear": (1e-4, 2e-2), "scaled_linear": (0.0015, 0.0155)}

# The smallest alpha_bar the samplers can use: they divide by sqrt(alpha_bar_t), computed in the
# latents' float32, so sqrt(alpha_bar) must be a normal float32 (>= 2**-126). LDM's schedule ends at
# 6.7e-4, the cosine schedule (T = 1000) at 2.4e-9.
MIN_ALPHA_BAR = 2.0 ** -252


def check_alpha_bar_floor(log_alpha_bar_end: float, key: str, hint: str) -> None:
    """Refuse a schedule whose alpha_bar at t = T-1 (given as its natural log) is below MIN_ALPHA_BAR."""
    if not log_alpha_bar_end >= math.log(MIN_ALPHA_BAR):
        value = math.exp(log_alpha_bar_end) if log_alpha_bar_end > -745 else 0.0
        raise ConfigError(key, f"alpha_bar at the last timestep is {value:.3g} (log {log_alpha_bar_end:.4g}): samplers "
                               f"divide by sqrt(alpha_bar_t) in float32, which needs alpha_bar >= "
                               f"{MIN_ALPHA_BAR:.3g} (a schedule of zero terminal SNR is not supported); {hint}")


@dataclass
class DiffusionConfig:
    """The forward process q(x_t | x_0) and the training objective.

    schedule: ``linear`` (beta_t linear from linear_start to linear_end),
        ``scaled_linear`` (sqrt(beta_t) linear; LDM's default, used by the
        LSUN-Churches LDM) or ``cosine`` (Nichol & Dhariwal 2021, offset ``cosine_s``).
    timesteps: T, the number of training timesteps (LDM: 1000).
    linear_start / linear_end: beta range; ``None`` takes the schedule's default
        (linear: 1e-4..2e-2, scaled_linear: 0.0015..0.0155). Not used by cosine.
    parameterization: what the UNet predicts, ``eps`` (noise) or ``v``
        (v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, Salimans & Ho 2022).
    loss: ``l2`` or ``l1`` distance to the target (LDM Churches uses l1).
    """

    schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    timesteps: int = 1000
    linear_start: Optional[float] = None
    linear_end: Optional[float] = None
    cosine_s: float = 0.008
    parameterization: Literal["eps", "v"] = "eps"
    loss: Literal["l2", "l1"] = "l2"

    def validate(self) -> None:
        if self.timesteps < 2:
            raise ConfigError("timesteps", f"must be at least 2, got {self.timesteps}")
        if self.schedule == "cosine":
            if not 0.0 <= self.cosine_s < 1.0:
                raise ConfigError("cosine_s", f"must be in [0, 1), got {self.cosine_s}")
            return
        start, end = self.beta_range()
        if not 0.0 < start < 1.0:
            raise ConfigError("linear_start", f"must be in (0, 1), got {start}")
        if not 0.0 < end < 1.0:
            raise ConfigError("linear_end", f"must be in (0, 1), got {end}")
        if end < start:
            raise ConfigError("linear_end", f"must be >= linear_start ({start}), got {end}")
        check_alpha_bar_floor(self._log_alpha_bar_end(start, end), "linear_end",
                              f"lower linear_end ({end}) or timesteps ({self.timesteps})")

    def _log_alpha_bar_end(self, start: float, end: float) -> float:
        """log alpha_bar_{T-1} = sum_t log(1 - beta_t) of the linear schedules (schedule.make_betas's betas)."""
        steps = self.timesteps - 1
        if self.schedule == "linear":
            betas = (start + (end - start) * i / steps for i in range(self.timesteps))
        else:
            lo, hi = math.sqrt(start), math.sqrt(end)
            betas = ((lo + (hi - lo) * i / steps) ** 2 for i in range(self.timesteps))
        return math.fsum(math.log1p(-beta) for beta in betas)

    def beta_range(self) -> tuple[float, float]:
        """(linear_start, linear_end) with the schedule's defaults filled in."""
        default = DEFAULT_BETA_RANGE.get(self.schedule, (None, None))
        start = default[0] if self.linear_start is None else self.linear_start
        end = default[1] if self.linear_end is None else self.linear_end
        return start, end


SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
Spacing = Literal["linspace", "leading", "trailing", "logsnr"]  # sgdm.diffusion.samplers.SPACINGS


def check_eta(eta: float, sampler: str) -> None:
    """DDIM's eta (a config's ``eta`` key) for ``sampler``: in [0, 1], and 0 unless ddim."""
    if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise ConfigError("eta", f"must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), got {eta}")
    if eta and sampler != "ddim":
        raise ConfigError("eta", f"only the ddim sampler uses eta; set it to 0 for sampler {sampler!r}")


@dataclass
class SamplerConfig:
    """Defaults for drawing samples.

    sampler: ``ddim`` (Song et al. 2021; the paper uses 250 steps, eta = 0),
        ``ddpm`` (ancestral) or ``dpmpp_2m`` (DPM-Solver++(2M), 20-25 steps).
    steps: number of denoising steps (<= diffusion.timesteps).
    eta: DDIM stochasticity in [0, 1] (0 = deterministic, 1 = DDPM-like); ddim only.
    spacing: which timesteps the sampler visits (``sgdm.diffusion.samplers.sampling_timesteps``):
        ``linspace`` (T - 1 down to 1), ``leading`` (LDM's), ``trailing`` or ``logsnr`` (evenly
        in log-SNR); unset (null): the sampler's own, linspace for ddim and ddpm, logsnr for
        dpmpp_2m. Like eta, it applies only with this section's sampler.
    guidance_scale: w in the paper's Eq. 4, eps = (1 - w) eps_uncond + w eps_cond
        (w = 0 unconditional, w = 1 conditional; equals eps_uncond + s (eps_cond -
        eps_uncond) with s = w).
    """

    sampler: Literal["ddim", "ddpm", "dpmpp_2m"] = "ddim"
    steps: int = 250
    eta: float = 0.0
    guidance_scale: float = 2.0
    spacing: Optional[Spacing] = None

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps", f"must be a positive number of steps, got {self.steps}")
        check_eta(self.eta, self.sampler)
        if not math.isfinite(self.guidance_scale):
            raise ConfigError("guidance_scale", f"must be finite, got {self.guidance_scale}")
