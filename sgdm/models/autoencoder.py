"""KL-regularised autoencoder: Latent Diffusion's first stage (Rombach et al. 2022, Sec. 3).

Module and parameter names are exactly those of LDM's ``AutoencoderKL``
(``ldm/models/autoencoder.py`` + ``ldm/modules/diffusionmodules/model.py``), so
LDM state dicts load strictly; see :mod:`sgdm.models.checkpoints` for the loaders.

Shapes (kl-f8 defaults): image x [B, 3, 256, 256] in [-1, 1] -> posterior over
z [B, embed_dim=4, 32, 32] -> decode(z) [B, 3, 256, 256] (nominally [-1, 1]; not
clamped, so reconstruction losses keep their gradients). The diffusion model works
on ``scale_factor * z`` with ``scale_factor = 1 / std(z)`` (LDM Sec. 4.3.2 / App. G).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sgdm.models.config import AutoencoderConfig
from sgdm.models.layers import GroupNorm, spatial_attention

__all__ = ["DiagonalGaussian", "Encoder", "Decoder", "AutoencoderKL", "compute_scale_factor", "load_autoencoder"]

_NORM_EPS = 1e-6  # LDM's Normalize() uses eps=1e-6


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), from the encoder's 2*embed_dim channels.

    ``logvar`` is clamped to [-30, 20] as in LDM for numerical safety.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * n, n ~ N(0, I) drawn on ``generator``'s device (None: torch's default generator
        of mean's device), [B, embed_dim, h, w] in mean's dtype and device."""
        gen_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=gen_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The posterior's mode, its ``mean`` [B, embed_dim, h, w] (no noise)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample: 0.5 * sum(mean^2 + var - 1 - logvar) over C, H, W -> [B]."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class ResnetBlock(nn.Module):
    """LDM ResnetBlock without time embedding: x + conv2(drop(SiLU(GN(conv1(SiLU(GN(x)))))))."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, _NORM_EPS, activation="silu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, _NORM_EPS, activation="silu")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.dropout(self.norm2(self.conv1(self.norm1(x)))))
        shortcut = getattr(self, "nin_shortcut", None)
        return (x if shortcut is None else shortcut(x)) + h


class AttnBlock(nn.Module):
    """LDM single-head spatial self-attention with 1x1-conv q, k, v and proj_out."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = GroupNorm(groups, channels, _NORM_EPS)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.proj_out(spatial_attention(self.q(h), self.k(h), self.v(h), num_heads=1))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (right, bottom) zero pad, as in LDM."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, dropout: float, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, dropout, groups)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """x [B, in_channels, R, R] -> moments [B, 2*z_channels (double_z) or z_channels, R/f, R/f]."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g, levels = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult, res = (1, *cfg.ch_mult), cfg.resolution
        self.down = nn.ModuleList()
        for i in range(levels):
            level, block_in = nn.Module(), cfg.ch * in_mult[i]
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[i], cfg.dropout, g))
                block_in = cfg.ch * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, g))
            if i != levels - 1:
                level.downsample, res = Downsample(block_in), res // 2
            self.down.append(level)
        self.mid = _mid(block_in, cfg.dropout, g)
        self.norm_out = GroupNorm(g, block_in, _NORM_EPS, activation="silu")
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(self.norm_out(_run_mid(self.mid, h)))


class Decoder(nn.Module):
    """z [B, z_channels, R/f, R/f] -> image [B, out_ch, R, R]."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g, levels = cfg.norm_groups, len(cfg.ch_mult)
        block_in, res = cfg.ch * cfg.ch_mult[-1], cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg.dropout, g)
        up = []
        for i in reversed(range(levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[i], cfg.dropout, g))
                block_in = cfg.ch * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, g))
            if i != 0:
                level.upsample, res = Upsample(block_in), res * 2
            up.insert(0, level)  # LDM indexes up[] by level, finest first
        self.up = nn.ModuleList(up)
        self.norm_out = GroupNorm(g, block_in, _NORM_EPS, activation="silu")
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(self.norm_out(h))


class AutoencoderKL(nn.Module):
    """LDM's KL autoencoder; ``scale_factor`` buffer (NaN until computed or configured)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        moments = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.quant_conv = nn.Conv2d(moments, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        sf = math.nan if cfg.scale_factor is None else float(cfg.scale_factor)
        self.register_buffer("scale_factor", torch.tensor(sf, dtype=torch.float32))

    @property
    def has_scale_factor(self) -> bool:
        """Whether ``scale_factor`` is set (finite), as :meth:`encode_latents` / :meth:`decode_latents` need."""
        return bool(torch.isfinite(self.scale_factor))

    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)`` / ``.half()`` cast the weights; the scale factor stays float32 (in bf16 0.18215
        would become 0.1826, a bias of every latent), and moves with them."""
        scale = self.scale_factor
        super()._apply(fn, recurse)
        if self.scale_factor.dtype != torch.float32:
            self.scale_factor = scale.to(device=self.scale_factor.device)
        return self

    def _weight_dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _check_image(self, x: torch.Tensor) -> None:
        f, c = self.cfg.downsample_factor, self.cfg.in_channels
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x: expected images [B, {c}, H, W] with H, W divisible by {f}, got "
                             f"{tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x [B, C, H, W] in [-1, 1] -> q(z|x) over [B, embed_dim, H/f, W/f]."""
        self._check_image(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, embed_dim, h, w] (unscaled) -> image [B, out_ch, h*f, w*f], nominally in [-1, 1]."""
        if z.dim() != 4 or z.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"z: expected latents [B, {self.cfg.embed_dim}, h, w], got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior (the autoencoder's training step)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _require_scale_factor(self) -> None:
        if not self.has_scale_factor:
            raise RuntimeError("scale_factor has not been set: run compute_scale_factor(ae, batches) once, or set "
                               "model.autoencoder.scale_factor")

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion-space latents: scale_factor * z, z ~ q(z|x)."""
        self._require_scale_factor()
        z = self.encode(x.to(self._weight_dtype())).sample(generator)
        return (z.to(_at_least_float32(z.dtype)) * self.scale_factor).to(x.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (clamped) from diffusion-space latents: decode(latents / scale_factor), the
        division in float32 (or float64 for float64 latents), the decoder in the autoencoder's dtype."""
        self._require_scale_factor()
        z = latents.to(_at_least_float32(latents.dtype)) / self.scale_factor
        return self.decode(z.to(self._weight_dtype())).clamp(-1.0, 1.0)


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16 / fp16 (the scale factor's own precision), the dtype itself if wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def compute_scale_factor(ae: AutoencoderKL, batches: Iterable[torch.Tensor],
                         generator: torch.Generator | None = None) -> float:
    """Set ``ae.scale_factor = 1 / std(z)`` over posterior samples of all ``batches``; return it.

    Statistics are accumulated in float64 over every latent element (LDM uses the
    first batch only; more batches give a steadier estimate).
    """
    count, total, total_sq = 0, 0.0, 0.0
    for i, x in enumerate(batches):
        if isinstance(x, dict):
            x = x["image"]
        z = ae.encode(x.to(ae.scale_factor.device, ae._weight_dtype())).sample(generator).double()
        count, total, total_sq = count + z.numel(), total + z.sum().item(), total_sq + z.square().sum().item()
    if count < 2:
        raise ValueError("batches: need at least one batch with two or more latent elements to compute scale_factor")
    var = (total_sq - total * total / count) / (count - 1)
    if not var > 0:
        raise ValueError(f"batches: latents have zero variance (std^2 = {var}); cannot compute scale_factor")
    ae.scale_factor.fill_(1.0 / math.sqrt(var))
    return float(ae.scale_factor)


def load_autoencoder(path, cfg: AutoencoderConfig) -> AutoencoderKL:
    """Build the autoencoder and load local weights in LDM (full or first-stage) or diffusers layout.

    See :func:`sgdm.models.checkpoints.load_autoencoder`.
    """
    from sgdm.models.checkpoints import load_autoencoder as _load  # checkpoints imports this module

    return _load(path, cfg)
