"""The guided UNet has the parameters of ADM/LDM's ``UNetModel`` plus the guidance's, counted
independently from ADM's construction (openai/guided-diffusion ``unet.py``, which LDM's
``openaimodel.py`` copies), for the paper configs' networks. Built on the meta device: no memory.

Guidance overhead (K classes, C = channels, E = 4C the time embedding): ``cond_embed`` adds
K*4C + 4C + 16C^2 + 4C, and every ResBlock's embedding projection reads 8C instead of 4C, adding
4C * s * out_ch per block (s = 2 with scale-shift norm, 1 without); map guidance adds
cond_channels * 9 * C to the first convolution.
"""
import pytest
import torch

from sgdm.models.config import UNetConfig
from sgdm.models.unet import UNet

CHURCHES = dict(channels=192, channel_mult=[1, 2, 2, 4, 4], num_res_blocks=2, attention_resolutions=[32, 16, 8, 4],
                num_heads=8, image_size=32)
IMAGENET100 = dict(channels=256, channel_mult=[1, 2, 4], num_res_blocks=2, attention_resolutions=[32, 16, 8],
                   num_head_channels=32, image_size=32)


def _adm_count(cfg: UNetConfig, cond_dim: int, cond_channels: int) -> int:
    """Parameters of ADM's UNetModel(cfg) with sgdm's guidance added, from ADM's constructor."""
    c = cfg.channels
    time = 4 * c
    emb = 2 * time if cond_dim else time
    s = 2 if cfg.use_scale_shift_norm else 1

    def res(i, o):
        return 2 * i + 9 * i * o + o + emb * s * o + s * o + 2 * o + 9 * o * o + o + (0 if i == o else i * o + o)

    def attn(ch):
        return 2 * ch + 3 * ch * ch + 3 * ch + ch * ch + ch

    def resample(ch):
        return res(ch, ch) if cfg.resblock_updown else 9 * ch * ch + ch

    total = c * time + time + time * time + time
    total += (cond_dim * time + time + time * time + time) if cond_dim else 0
    total += 9 * (cfg.in_channels + cond_channels) * c + c
    chans, ch, ds = [c], c, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            total += res(ch, mult * c)
            ch = mult * c
            total += attn(ch) if cfg.image_size // ds in cfg.attention_resolutions else 0
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            total += resample(ch)
            chans.append(ch)
            ds *= 2
    total += 2 * res(ch, ch) + attn(ch)
    for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
        for i in range(cfg.num_res_blocks + 1):
            total += res(ch + chans.pop(), c * mult)
            ch = c * mult
            total += attn(ch) if cfg.image_size // ds in cfg.attention_resolutions else 0
            if level and i == cfg.num_res_blocks:
                total += resample(ch)
                ds //= 2
    return total + 2 * c + 9 * c * cfg.out_channels + cfg.out_channels


def _count(cfg: UNetConfig, cond_dim: int, cond_channels: int) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(cfg, cond_dim, cond_channels).parameters())


@pytest.mark.parametrize("net", [CHURCHES, IMAGENET100], ids=["churches", "imagenet100"])
@pytest.mark.parametrize("updown_scale_shift", [True, False])
@pytest.mark.parametrize("cond_dim, cond_channels", [(0, 0), (100, 0), (20, 1), (27, 27)])
def test_unet_has_adms_parameters_plus_the_guidance(net, updown_scale_shift, cond_dim, cond_channels):
    cfg = UNetConfig(**net, resblock_updown=updown_scale_shift, use_scale_shift_norm=updown_scale_shift)
    assert _count(cfg, cond_dim, cond_channels) == _adm_count(cfg, cond_dim, cond_channels)

