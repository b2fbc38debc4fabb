"""The guidance-conditioned denoising UNet (ADM / LDM style) that predicts eps (or v).

Guidance enters in the paper's three ways (Hu et al., CVPR 2023, Sec. 3):

* image level (Eq. 7): the vector k in R^K (one-hot cluster, or multi-hot) goes
  through ``cond_embed`` (Linear K->4C, SiLU, Linear 4C->4C) and is concatenated
  with the time embedding ``time_embed(sinusoid(t))`` (also 4C):
  ``emb = [time_embed(t) ; cond_embed(k)]`` in R^{8C}. Every ResBlock maps ``emb``
  with its own SiLU+Linear to a per-channel scale and shift, so the concatenation
  conditions every block without an extra fusion layer;
* box level (Eq. 8) and mask level (Eq. 9): ``cond_map`` (1-channel box mask or
  K-channel one-hot mask, any resolution, on x_t's device) is resized to the latent
  grid (``cond_resize``) and concatenated with x_t along channels before the first
  convolution.

The null condition is all zeros for both k and the map (what guidance dropout
substitutes), so one network gives eps_cond and eps_uncond. A model built with
``cond_dim=0, cond_channels=0`` takes no condition at all.

Shapes: x_t [B, in_channels, h, w] (h, w divisible by 2**(len(channel_mult)-1)), t [B]
or a scalar for the whole batch (integer or fractional timesteps), cond [B, cond_dim], cond_map
[B, cond_channels, H', W'] -> [B, out_channels, h, w].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgdm import ops
from sgdm.models.config import UNetConfig, level_resolutions
from sgdm.models.layers import GroupNorm, maybe_checkpoint, spatial_attention, timestep_embedding, zero_module

__all__ = ["UNet", "ResBlock", "AttentionBlock"]


class ResBlock(nn.Module):
    """ADM residual block: GN-SiLU-conv, embedding as scale-shift (or added), GN-SiLU-dropout-zero conv.

    With scale-shift norm: h = SiLU(GN(h) * (1 + scale) + shift), (scale, shift) = Linear(SiLU(emb)).
    ``up``/``down`` resample both paths (nearest x2 / 2x2 average) after the first norm (ADM's
    resblock_updown).
    """

    def __init__(self, in_ch: int, emb_dim: int, out_ch: int, dropout: float, groups: int,
                 scale_shift: bool, up: bool = False, down: bool = False):
        super().__init__()
        self.scale_shift, self.up, self.down = scale_shift, up, down
        self.in_norm = GroupNorm(groups, in_ch, activation="silu")
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch))
        # With scale-shift the block calls ops.group_norm_silu with this norm's parameters folded
        # into a per-sample affine (see forward); the module keeps the parameters and their keys.
        self.out_norm = GroupNorm(groups, out_ch, activation=None if scale_shift else "silu")
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(self._resample(self.in_norm(x)))
        x = self._resample(x)
        e = self.emb_proj(emb).to(h.dtype)  # [B, 2C] (scale, shift) or [B, C]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            # Folded into GN's affine (w, b) as a per-sample one, norm, modulation and SiLU are one
            # fused pass instead of four (forward and backward):
            #   GN(h) * (1 + scale) + shift = xhat * [w (1 + scale)] + [b (1 + scale) + shift].
            norm, gain = self.out_norm, 1 + scale
            h = ops.group_norm_silu(h, norm.num_groups, norm.weight * gain, norm.bias * gain + shift,
                                    norm.eps)
        else:
            h = self.out_norm(h + e[..., None, None])
        return self.skip(x) + self.out_conv(self.dropout(h))


class AttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention over pixels with a zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        return x + self.proj_out(spatial_attention(q, k, v, self.num_heads))


class _Resample(nn.Module):
    """Plain (non-residual) resampling: stride-2 conv down, or nearest x2 + conv up."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class _Stage(nn.ModuleList):
    """Layers applied in order, each given the embedding (ResBlocks use it, the rest ignore it)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        for layer in self:
            x = maybe_checkpoint(layer, checkpointing, x, emb)
        return x


class UNet(nn.Module):
    """Denoiser eps_theta(x_t, t, k, k_s) of the self-guided LDM (see module docstring).

    Like every ``nn.Module``, it initialises its weights from the global CPU generator; build it
    under ``sgdm.training.rng.seeded_cpu_rng(seed)`` (as training does) for the same weights
    every time."""

    def __init__(self, cfg: UNetConfig, cond_dim: int = 0, cond_channels: int = 0):
        super().__init__()
        cfg.validate()
        if cond_dim < 0 or cond_channels < 0:
            raise ValueError(f"cond_dim and cond_channels must be >= 0, got {cond_dim}, {cond_channels}")
        self.cfg, self.cond_dim, self.cond_channels = cfg, cond_dim, cond_channels
        ch, temb = cfg.channels, 4 * cfg.channels
        self.time_embed = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.cond_embed = (nn.Sequential(nn.Linear(cond_dim, temb), nn.SiLU(), nn.Linear(temb, temb))
                           if cond_dim else None)
        emb_dim = temb * (2 if cond_dim else 1)
        self.conv_in = nn.Conv2d(cfg.in_channels + cond_channels, ch, 3, padding=1)
        skip_channels = self._build_down(emb_dim)
        self.middle = _Stage([self._res(self._ch, emb_dim, self._ch), self._attn(self._ch),
                              self._res(self._ch, emb_dim, self._ch)])
        self._build_up(emb_dim, skip_channels)
        self.out = nn.Sequential(GroupNorm(cfg.norm_groups, ch, activation="silu"),
                                 zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def _res(self, in_ch: int, emb_dim: int, out_ch: int, up: bool = False, down: bool = False) -> ResBlock:
        c = self.cfg
        return ResBlock(in_ch, emb_dim, out_ch, c.dropout, c.norm_groups, c.use_scale_shift_norm, up, down)

    def _attn(self, ch: int) -> AttentionBlock:
        return AttentionBlock(ch, self.cfg.heads_for(ch), self.cfg.norm_groups)

    def _build_down(self, emb_dim: int) -> list[int]:
        c = self.cfg
        resolutions = level_resolutions(c.image_size, len(c.channel_mult))
        self.down = nn.ModuleList()
        ch, skips = c.channels, [c.channels]
        for level, (mult, res) in enumerate(zip(c.channel_mult, resolutions)):
            for _ in range(c.num_res_blocks):
                layers = [self._res(ch, emb_dim, c.channels * mult)]
                ch = c.channels * mult
                if res in c.attention_resolutions:
                    layers.append(self._attn(ch))
                self.down.append(_Stage(layers))
                skips.append(ch)
            if level != len(c.channel_mult) - 1:
                sample = self._res(ch, emb_dim, ch, down=True) if c.resblock_updown else _Resample(ch, up=False)
                self.down.append(_Stage([sample]))
                skips.append(ch)
        self._ch = ch
        return skips

    def _build_up(self, emb_dim: int, skips: list[int]) -> None:
        c = self.cfg
        resolutions = level_resolutions(c.image_size, len(c.channel_mult))
        self.up = nn.ModuleList()
        ch = self._ch
        for level in reversed(range(len(c.channel_mult))):
            out_ch = c.channels * c.channel_mult[level]
            for i in range(c.num_res_blocks + 1):
                layers = [self._res(ch + skips.pop(), emb_dim, out_ch)]
                ch = out_ch
                if resolutions[level] in c.attention_resolutions:
                    layers.append(self._attn(ch))
                if level and i == c.num_res_blocks:
                    layers.append(self._res(ch, emb_dim, ch, up=True) if c.resblock_updown
                                  else _Resample(ch, up=True))
                self.up.append(_Stage(layers))

    def _check_inputs(self, x_t, t, cond, cond_map) -> torch.Tensor:
        c = self.cfg
        if x_t.dim() != 4 or x_t.shape[1] != c.in_channels:
            raise ValueError(f"x_t: expected [B, {c.in_channels}, h, w], got shape {tuple(x_t.shape)}")
        factor = 2 ** (len(c.channel_mult) - 1)
        if x_t.shape[2] % factor or x_t.shape[3] % factor:
            raise ValueError(f"x_t: spatial size {tuple(x_t.shape[2:])} is not divisible by {factor}")
        b = x_t.shape[0]
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            # training draws t on the CPU: copied without waiting for the device's queued work
            t = t.to(x_t.device, non_blocking=True)
        else:
            t = torch.as_tensor(t, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t: expected shape [{b}] (one timestep per sample), got {tuple(t.shape)}")
        if self.cond_dim == 0 and cond is not None:
            raise ValueError("cond: this UNet was built without image-level guidance (cond_dim=0); pass cond=None")
        if self.cond_channels == 0 and cond_map is not None:
            raise ValueError("cond_map: this UNet was built without spatial guidance (cond_channels=0); "
                             "pass cond_map=None")
        if cond is not None and tuple(cond.shape) != (b, self.cond_dim):
            raise ValueError(f"cond: expected shape [{b}, {self.cond_dim}], got {tuple(cond.shape)}")
        if cond_map is not None and (cond_map.dim() != 4 or tuple(cond_map.shape[:2]) != (b, self.cond_channels)):
            raise ValueError(f"cond_map: expected shape [{b}, {self.cond_channels}, H, W], got "
                             f"{tuple(cond_map.shape)}")
        for name, value in (("cond", cond), ("cond_map", cond_map)):
            if value is not None and value.device != x_t.device:
                raise ValueError(f"{name}: is on {value.device} but x_t is on {x_t.device}; move the guidance "
                                 f"to x_t's device")
        return t

    def _complete_condition(self, x_t, cond, cond_map):
        """Both None -> the null condition (zeros); only one of two required inputs -> error."""
        needs_cond, needs_map = self.cond_dim > 0, self.cond_channels > 0
        if needs_cond and needs_map and (cond is None) != (cond_map is None):
            missing = "cond" if cond is None else "cond_map"
            raise ValueError(f"{missing}: this UNet takes both cond and cond_map; pass both, or neither "
                             f"for the null condition")
        b, (h, w) = x_t.shape[0], x_t.shape[2:]
        if needs_cond and cond is None:
            cond = x_t.new_zeros(b, self.cond_dim)
        if needs_map and cond_map is None:
            cond_map = x_t.new_zeros(b, self.cond_channels, h, w)
        return cond, cond_map

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                cond_map: torch.Tensor | None = None) -> torch.Tensor:
        """Predict eps (or v) for x_t at timesteps t under guidance (cond, cond_map); see module docstring.

        Passing neither cond nor cond_map to a guided UNet gives the unconditional (null) prediction.
        """
        t = self._check_inputs(x_t, t, cond, cond_map)
        cond, cond_map = self._complete_condition(x_t, cond, cond_map)
        emb = self.time_embed(timestep_embedding(t, self.cfg.channels).to(self.time_embed[0].weight.dtype))
        if self.cond_embed is not None:
            emb = torch.cat([emb, self.cond_embed(cond.to(emb.dtype))], dim=1)
        h = x_t
        if cond_map is not None:
            if cond_map.shape[2:] != x_t.shape[2:]:
                # "nearest" reads each latent cell at its centre (nearest-exact), as resize_class_map and the
                # pipeline grow maps; plain nearest reads a cell's top-left pixel, shifting a shrunk map
                mode = "nearest-exact" if self.cfg.cond_resize == "nearest" else self.cfg.cond_resize
                cond_map = F.interpolate(cond_map.float(), size=x_t.shape[2:], mode=mode)
            h = torch.cat([x_t, cond_map.to(x_t.dtype)], dim=1)
        ckpt = self.cfg.gradient_checkpointing
        h = self.conv_in(h)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb, ckpt)
            skips.append(h)
        h = self.middle(h, emb, ckpt)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, ckpt)
        return self.out(h)
