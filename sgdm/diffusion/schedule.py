"""Noise schedules of the forward process and q(x_t | x_0).

Forward process (DDPM): q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
with alpha_bar_t = prod_{s<=t} (1 - beta_s), t = 0 .. T-1 (0-based, as LDM).
All schedule values are float64; they are cast to the data dtype only when
applied, so fp16/bf16 training does not round alpha_bar near 0 or 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sgdm.config.core import ConfigError
from sgdm.diffusion.config import DEFAULT_BETA_RANGE, DiffusionConfig, check_alpha_bar_floor

__all__ = ["NoiseSchedule", "make_betas", "make_schedule", "q_sample", "broadcast_to", "eps_from_output",
           "v_target"]


@dataclass(frozen=True)
class NoiseSchedule:
    """betas [T] and alpha_bar [T] (float64, CPU). ``len(schedule)`` is T."""

    betas: torch.Tensor
    alpha_bar: torch.Tensor
    # alpha_bar copied once to each other device it is looked up on (see ``at``), keyed by device
    _device_alpha_bar: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "NoiseSchedule":
        """The schedule of ``betas`` [T] (any real dtype or sequence, T >= 2, every value in (0, 1)):
        alpha_bar_t = prod_{s<=t} (1 - beta_s), both float64 on the CPU; ValueError naming ``betas``, also
        when alpha_bar_{T-1} is too small for the samplers (``config.MIN_ALPHA_BAR``)."""
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.dim() != 1 or len(betas) < 2:
            raise ValueError(f"betas: expected a 1-D tensor of at least 2 values, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas: every value must lie in (0, 1)")
        try:
            check_alpha_bar_floor(float(torch.log1p(-betas).sum()), "betas", "use smaller betas or fewer of them")
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return cls(betas=betas, alpha_bar=torch.cumprod(1.0 - betas, 0))

    def __len__(self) -> int:
        return len(self.betas)

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t for integer timesteps ``t`` (any shape), float64 on t's device.

        On the CPU t's range is checked before the lookup, with an error naming it. Elsewhere that
        check would read t back to the host, and a fresh copy of alpha_bar to the device would wait
        on it too: a host sync per call, i.e. per sampler step of a v-prediction model. There the
        lookup indexes a copy of alpha_bar kept on that device (made on the first call) and the range
        is asserted on the device (``torch._assert_async``): a bad t still stops the program, at the
        next synchronisation, instead of reading a wrong or wrapped-around value.
        """
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point:
            raise TypeError(f"t: expected integer timesteps, got dtype {t.dtype}")
        if t.device.type == "cpu":
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= len(self)):
                raise ValueError(f"t: timesteps must be in [0, {len(self) - 1}], got range "
                                 f"[{int(t.min())}, {int(t.max())}]")
            return self.alpha_bar[t]
        table = self._device_alpha_bar.get(t.device)
        if table is None:
            table = self._device_alpha_bar[t.device] = self.alpha_bar.to(t.device)
        torch._assert_async(((t >= 0) & (t < len(self))).all(), f"t: timesteps must be in [0, {len(self) - 1}]")
        return table[t]


def make_betas(kind: str, timesteps: int, linear_start: float | None = None, linear_end: float | None = None,
               cosine_s: float = 0.008) -> torch.Tensor:
    """beta_t, t = 0..T-1, float64.

    linear:        beta_t = start + (end - start) t / (T - 1)
    scaled_linear: sqrt(beta_t) = sqrt(start) + (sqrt(end) - sqrt(start)) t / (T - 1)   (LDM's "linear")
    cosine:        alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2),
                   beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), 0.999)          (Nichol & Dhariwal Eq. 17)
    ``linear_start`` / ``linear_end`` None: the schedule's default (as in ``DiffusionConfig``).
    """
    if kind in DEFAULT_BETA_RANGE:
        default_start, default_end = DEFAULT_BETA_RANGE[kind]
        linear_start = default_start if linear_start is None else linear_start
        linear_end = default_end if linear_end is None else linear_end
    if kind == "linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"schedule: unknown kind {kind!r} (expected linear, scaled_linear or cosine)")


def make_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    """The schedule a (validated) ``DiffusionConfig`` describes."""
    start, end = cfg.beta_range()
    return NoiseSchedule.from_betas(make_betas(cfg.schedule, cfg.timesteps, start, end, cfg.cosine_s))


def broadcast_to(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values [B] as [B, 1, ..., 1] in x's dtype and device (copied from the CPU without
    waiting for the device's queued work: a copy from pageable memory is staged before the call returns)."""
    values = values.to(device=x.device, dtype=x.dtype, non_blocking=values.device.type == "cpu")
    return values.view(-1, *([1] * (x.dim() - 1)))


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM Eq. 4).

    x0, noise: [B, ...]; t: [B] integer timesteps, on any device (training keeps them on the CPU, where
    indexing and range-checking the schedule needs no host sync). Returns x_t like x0.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise: expected shape {tuple(x0.shape)} like x0, got {tuple(noise.shape)}")
    a = schedule.at(t)
    if a.shape != x0.shape[:1]:
        raise ValueError(f"t: expected shape [{x0.shape[0]}] (one timestep per sample), got {tuple(t.shape)}")
    return broadcast_to(a.sqrt(), x0) * x0 + broadcast_to((1 - a).sqrt(), x0) * noise


def v_target(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, Eq. in Sec. 4); t on any device."""
    a = schedule.at(t)
    return broadcast_to(a.sqrt(), x0) * noise - broadcast_to((1 - a).sqrt(), x0) * x0


def eps_from_output(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor,
                    parameterization: str) -> torch.Tensor:
    """The noise estimate from the network output: eps itself, or from v as
    eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t. With t on x_t's device (as samplers pass
    it) nothing is read back to the host (see :meth:`NoiseSchedule.at`)."""
    if parameterization == "eps":
        return output
    if parameterization != "v":
        raise ValueError(f"parameterization: expected 'eps' or 'v', got {parameterization!r}")
    a = schedule.at(t.to(x_t.device))
    return broadcast_to(a.sqrt(), x_t) * output + broadcast_to((1 - a).sqrt(), x_t) * x_t
