import pytest
import torch

from sgdm.models.autoencoder import AutoencoderKL
from sgdm.models.unet import UNet

from tests.models.helpers import K, randomize_, tiny_autoencoder_config, tiny_unet_config


def _unet_inputs(generator):
    x = torch.randn(2, 4, 8, 8, generator=generator)
    cond_map = (torch.rand(2, 1, 16, 16, generator=generator) > 0.5).float()
    return x, torch.tensor([10, 900]), torch.eye(K)[[0, 2]], cond_map


def test_unet_under_bf16_autocast_stays_close_to_fp32(generator):
    model = randomize_(UNet(tiny_unet_config(), K, 1), generator)
    x, t, cond, cond_map = _unet_inputs(generator)
    ref = model(x, t, cond, cond_map)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond, cond_map)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-3
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.cuda
def test_unet_and_autoencoder_on_cuda_match_cpu(generator):
    unet = randomize_(UNet(tiny_unet_config(), K, 1), generator).eval()
    ae = randomize_(AutoencoderKL(tiny_autoencoder_config()), generator, std=0.1).eval()
    x, t, cond, cond_map = _unet_inputs(generator)
    img = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    with torch.no_grad():
        ref_eps, ref_mean = unet(x, t, cond, cond_map), ae.encode(img).mean
        unet.cuda(), ae.cuda()
        eps = unet(x.cuda(), t.cuda(), cond.cuda(), cond_map.cuda())
        mean = ae.encode(img.cuda()).mean
    torch.testing.assert_close(eps.cpu(), ref_eps, rtol=1e-2, atol=2e-3)  # cuDNN convs may run in TF32
    torch.testing.assert_close(mean.cpu(), ref_mean, rtol=1e-2, atol=2e-3)  # cuDNN convs may run in TF32
