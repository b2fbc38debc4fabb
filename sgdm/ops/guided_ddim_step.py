"""The guided DDIM step, fused into one pass over memory.

With a_t = alpha_bar_t, a_prev = alpha_bar_prev and w = guidance_scale:

    eps     = (1 - w) * eps_uncond + w * eps_cond     self-guided diffusion, Hu et al. 2023, Eq. 4
                                                      (w = 1: conditional, w = 0: unconditional;
                                                      eps_uncond=None: eps = eps_cond)
    x0      = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    x_prev  = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma_t^2) * eps + sigma_t * noise
                                                      DDIM, Song et al. 2021, Eq. 12

eta lies in [0, 1] (DDIM's range: 0 deterministic, 1 DDPM's posterior variance); above 1,
1 - a_prev - sigma_t^2 turns negative on large steps.

With ``clip_x0=c``, x0 is clamped to [-c, c] and eps re-derived from it,
eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t), so both terms agree. At a_t = 1
there is no noise left: sigma_t = 0 and eps is kept.

Eager PyTorch spends about ten kernel launches and as many passes over memory
on this expression; the compiled op reads each input once and writes both
outputs once. The kernel has no autograd formula (sampling needs none): a call that
needs gradients (grad mode on and an input that requires them) runs the differentiable
reference instead, so gradients never silently stop at the step.
"""
from __future__ import annotations

import math

import torch

from sgdm.ops import _extension
from sgdm.ops._checks import check_float_tensor, check_like, check_number
from sgdm.ops.reference import guided_ddim_step_ref

_OP = "guided_ddim_step"
_NAME = "guided_ddim_step"
_REAL = (float, int)


def _check_alpha(a, name: str, x_t: torch.Tensor):
    """A float in (0, 1] or a [B] tensor of them; returns (tensor or None, float)."""
    if type(a) is float and 0.0 < a <= 1.0:  # the usual case, decided in one comparison
        return None, a
    if not isinstance(a, torch.Tensor):
        return None, check_number(a, name, _NAME, low=0.0, high=1.0, low_open=True)
    if not a.is_floating_point() or tuple(a.shape) != (x_t.shape[0],):
        raise ValueError(f"{_NAME}: {name} must be a float or a float tensor of shape "
                         f"[B] = [{x_t.shape[0]}], got {a.dtype} {tuple(a.shape)}")
    a = a.to(device=x_t.device)  # a per-sample scalar, not data: any device is accepted
    in_range = ((a > 0) & (a <= 1)).all()
    if torch.compiler.is_compiling():  # no data while tracing: checked when the graph runs
        torch._assert_async(in_range, f"{_NAME}: every {name} must lie in (0, 1]")
    elif not bool(in_range):
        raise ValueError(f"{_NAME}: every {name} must lie in (0, 1], got {a.tolist()}")
    return a, 1.0


_NOISE_REQUIRED = (f"{_NAME}: noise is required when eta > 0 (sigma_t > 0); draw it with "
                   "torch.randn(..., generator=...)")


def _check_noise_needed(eta: float, a_t, a_prev) -> None:
    """Raises when sigma_t > 0 for some sample (so noise is needed) and none was given."""
    if eta == 0.0:
        return
    if isinstance(a_t, torch.Tensor) or isinstance(a_prev, torch.Tensor):
        device = (a_t if isinstance(a_t, torch.Tensor) else a_prev).device
        a_t, a_prev = (torch.as_tensor(a, dtype=torch.float64, device=device) for a in (a_t, a_prev))
        positive = ((a_t < 1) & (a_prev < 1) & (a_t < a_prev)).any()
        if torch.compiler.is_compiling():  # no data while tracing: checked when the graph runs
            torch._assert_async(~positive, _NOISE_REQUIRED)
        elif bool(positive):
            raise ValueError(_NOISE_REQUIRED)
    elif a_t < 1.0 and a_prev < 1.0 and a_t < a_prev:
        raise ValueError(_NOISE_REQUIRED)


def _check_tensors(x_t, eps_cond, eps_uncond, noise) -> None:
    """The tensor arguments' metadata (no data is read: the fake kernel runs it too)."""
    check_float_tensor(x_t, "x_t", _NAME, min_dim=1, shape_hint="[B, ...]")
    check_like(eps_cond, "eps_cond", x_t, "x_t", _NAME)
    if eps_uncond is not None:
        check_like(eps_uncond, "eps_uncond", x_t, "x_t", _NAME)
    if noise is not None:
        check_like(noise, "noise", x_t, "x_t", _NAME)


def _check(x_t, eps_cond, alpha_bar_t, alpha_bar_prev, eps_uncond, guidance_scale, eta, noise,
           clip_x0):
    _check_tensors(x_t, eps_cond, eps_uncond, noise)
    at_tensor, at_scalar = _check_alpha(alpha_bar_t, "alpha_bar_t", x_t)
    ap_tensor, ap_scalar = _check_alpha(alpha_bar_prev, "alpha_bar_prev", x_t)
    w = check_number(guidance_scale, "guidance_scale", _NAME)
    eta = check_number(eta, "eta", _NAME, low=0.0, high=1.0)
    if clip_x0 is not None:
        clip_x0 = check_number(clip_x0, "clip_x0", _NAME, low=0.0, low_open=True)
    if noise is None:
        _check_noise_needed(eta, at_scalar if at_tensor is None else at_tensor,
                            ap_scalar if ap_tensor is None else ap_tensor)
    return (at_tensor, at_scalar), (ap_tensor, ap_scalar), w, eta, clip_x0


def _wants_grad(*args) -> bool:
    """Whether autograd would record this call: grad mode on and some tensor argument requiring grad."""
    return torch.is_grad_enabled() and any(getattr(a, "requires_grad", False) for a in args)


def guided_ddim_step(x_t: torch.Tensor, eps_cond: torch.Tensor, alpha_bar_t, alpha_bar_prev,
                     eps_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                     eta: float = 0.0, noise: torch.Tensor | None = None,
                     clip_x0: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One guided DDIM update (formulas in the module docstring); returns ``(x_prev, x0_pred)``.

    x_t, eps_cond, eps_uncond, noise: [B, ...], one shape, dtype (fp32/fp16/bf16/fp64) and
    device; arithmetic in fp32 (fp64 for fp64). alpha_bar_t, alpha_bar_prev: floats in (0, 1]
    or per-sample tensors [B]. ``noise`` (standard normal, drawn by the caller with its own
    ``torch.Generator``) is needed only when sigma_t > 0. Outputs have x_t's dtype and layout
    (contiguous or channels-last).
    """
    # The usual sampling call (float alphas, eta = 0, no clipping) goes straight to the op:
    # its C++ glue and fake kernel check the tensors, and a failure there is diagnosed again
    # by the checks below, so the error still names the argument. The Python checks cost
    # 1.5-2.5 us a call, 4-7% of the step on [64, 4, 32, 32] latents on the CPU.
    if (type(alpha_bar_t) is float and type(alpha_bar_prev) is float and noise is None
            and clip_x0 is None and 0.0 < alpha_bar_t <= 1.0 and 0.0 < alpha_bar_prev <= 1.0
            and type(guidance_scale) in _REAL and -math.inf < guidance_scale < math.inf
            and type(eta) in _REAL and eta == 0 and isinstance(x_t, torch.Tensor)
            and not torch.compiler.is_compiling()
            and _extension.kernels_enabled(_OP, "cpu" if x_t.is_cpu else x_t.device.type)
            and not _wants_grad(x_t, eps_cond, eps_uncond)):
        try:
            return torch.ops.sgdm.guided_ddim_step(x_t, eps_cond, eps_uncond, None, None, None,
                                                   alpha_bar_t, alpha_bar_prev,
                                                   float(guidance_scale), 0.0, None)
        except Exception:
            _check(x_t, eps_cond, alpha_bar_t, alpha_bar_prev, eps_uncond, guidance_scale, eta,
                   noise, clip_x0)  # raises the error that names the argument
            raise
    (at_t, at_s), (ap_t, ap_s), w, eta, clip_x0 = _check(
        x_t, eps_cond, alpha_bar_t, alpha_bar_prev, eps_uncond, guidance_scale, eta, noise, clip_x0)
    # the kernel has no autograd formula: a call that needs gradients runs the reference
    if _extension.kernels_enabled(_OP, x_t.device.type) and not _wants_grad(
            x_t, eps_cond, eps_uncond, noise if eta else None, at_t, ap_t):
        return torch.ops.sgdm.guided_ddim_step(x_t, eps_cond, eps_uncond, noise if eta else None,
                                               at_t, ap_t, at_s, ap_s, w, eta, clip_x0)
    return guided_ddim_step_ref(x_t, eps_cond, alpha_bar_t if at_t is None else at_t,
                                alpha_bar_prev if ap_t is None else ap_t, eps_uncond, w, eta,
                                noise if eta else None, clip_x0)


def _register() -> None:
    @torch.library.register_fake("sgdm::guided_ddim_step")
    def _fake(x_t, eps_cond, eps_uncond, noise, alpha_bar_t, alpha_bar_prev, alpha_bar_t_scalar,
              alpha_bar_prev_scalar, guidance_scale, eta, clip_x0):
        # The checks of the C++ glue that need no data (it raises on meta tensors, e.g. a
        # meta eps_cond beside a CPU x_t, which dispatch sends here). At eta = 0 it neither
        # checks nor reads noise, which then has no say in the layout either.
        noise = noise if eta != 0.0 else None
        _check_tensors(x_t, eps_cond, eps_uncond, noise)
        for name, a in (("alpha_bar_t", alpha_bar_t), ("alpha_bar_prev", alpha_bar_prev)):
            if a is not None and tuple(a.shape) != (x_t.shape[0],):
                raise ValueError(f"{_NAME}: {name} must be a float or a float tensor of shape "
                                 f"[B] = [{x_t.shape[0]}], got {tuple(a.shape)}")
        # Mirrors csrc/guided_ddim_step.cpp: a dense layout shared by all inputs is kept.
        others = [t for t in (eps_cond, eps_uncond, noise) if t is not None]
        dense = x_t.is_contiguous() or (x_t.dim() == 4 and x_t.is_contiguous(
            memory_format=torch.channels_last)) or (x_t.dim() == 5 and x_t.is_contiguous(
                memory_format=torch.channels_last_3d))
        if dense and all(t.stride() == x_t.stride() for t in others):
            return torch.empty_like(x_t), torch.empty_like(x_t)
        return x_t.new_empty(x_t.shape), x_t.new_empty(x_t.shape)


if _extension.has_op(_OP):
    _register()
