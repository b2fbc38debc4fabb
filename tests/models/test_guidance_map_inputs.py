"""The guided UNet's inputs: guidance maps at another resolution, and guidance on another device."""
import pytest
import torch

from sgdm.models.conditioning import condition_dims
from sgdm.models.unet import UNet

from tests.models.helpers import K, guidance, randomize_, tiny_unet_config


def _unet(kind, generator, **overrides):
    cond_dim, cond_channels = condition_dims(guidance(kind))
    return randomize_(UNet(tiny_unet_config(**overrides), cond_dim, cond_channels), generator).eval()


def test_nearest_shrink_samples_each_cells_centre_not_its_corner(generator):
    """A box map at 3x the latent grid: each latent cell is read at its centre pixel. Plain nearest read the
    top-left pixel of every 3x3 cell, moving the map by a pixel of the map (a third of a latent cell) up
    and left; here the corner pixels carry the opposite value, so that reading gives the inverted map."""
    model = _unet("box", generator)
    x, t, cond = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([3, 700]), torch.eye(K)[[1, 3]]
    small = (torch.rand(2, 1, 8, 8, generator=generator) > 0.5).float()
    big = 1 - small.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3)
    big[:, :, 1::3, 1::3] = small  # the centre pixel of every 3x3 cell
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond, big), model(x, t, cond, small))


def test_nearest_growth_by_a_fraction_takes_cell_centres(generator):
    """Growing 6 -> 8 (not a whole factor) reads each latent cell's centre, as resize_class_map and the
    pipeline grow maps (nearest-exact): latent rows 0..7 read map rows 0, 1, 1, 2, 3, 4, 4, 5."""
    model = _unet("box", generator)
    x, t, cond = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([3, 700]), torch.eye(K)[[1, 3]]
    small = (torch.rand(2, 1, 6, 6, generator=generator) > 0.5).float()
    rows = torch.tensor([0, 1, 1, 2, 3, 4, 4, 5])
    grown = small[:, :, rows][:, :, :, rows]
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond, small), model(x, t, cond, grown))


@pytest.mark.parametrize("name", ["cond", "cond_map"])
def test_guidance_on_another_device_is_named(name, generator):
    model = _unet("box", generator)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([3, 700])
    inputs = {"cond": torch.eye(K)[[1, 3]], "cond_map": torch.ones(2, 1, 8, 8)}
    inputs[name] = inputs[name].to("meta")
    with pytest.raises(ValueError, match=f"^{name}: is on meta but x_t is on cpu"):
        model(x, t, inputs["cond"], inputs["cond_map"])


def test_an_unknown_cond_resize_is_refused_when_the_unet_is_built():
    """The config loader checks the Literal; a UNetConfig made in code was built and resized maps with any
    mode F.interpolate takes (bilinear blends box edges), or failed at the first resize."""
    from sgdm.config.core import ConfigError

    with pytest.raises(ConfigError, match="^cond_resize: must be one of nearest, area"):
        UNet(tiny_unet_config(cond_resize="bilinear"), K, 1)
