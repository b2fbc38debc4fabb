"""The LPIPS weight files (model.autoencoder.loss.vgg16_weights / lpips_heads) that exist but
cannot be read as state dicts: a whole pickled torchvision model (``torch.save(vgg16())``, which
weights_only refuses) or a truncated download. Each is a ConfigError naming the key and the file."""
import pytest
import torch

from sgdm.config.core import ConfigError
from sgdm.models import autoencoder_losses as al


def _pickled_module(path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.save(make_layers(cfgs["A"]), path)  # a whole nn.Sequential, not a state dict


def _truncated(path):
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize("write", [_pickled_module, _truncated], ids=["pickled-module", "truncated"])
def test_an_unreadable_vgg16_file_names_the_key_and_the_file(write, tmp_path):
    path = tmp_path / "vgg16.pth"
    write(path)
    with pytest.raises(ConfigError) as err:
        al.build_lpips(path)
    assert err.value.key == "model.autoencoder.loss.vgg16_weights"
    assert str(path) in err.value.message and "cannot be read" in err.value.message


@pytest.mark.parametrize("write", [_pickled_module, _truncated], ids=["pickled-module", "truncated"])
def test_an_unreadable_heads_file_names_the_key_and_the_file(write, tmp_path, monkeypatch):
    heads = tmp_path / "vgg.pth"
    write(heads)
    # the backbone is not what is tested: any state dict the LPIPS backbone accepts
    monkeypatch.setattr(al, "_load_vgg_backbone", lambda lpips, state, source: None)
    monkeypatch.setattr(al, "_vgg16_state", lambda weights, download: ({}, "test"))
    with pytest.raises(ConfigError) as err:
        al.build_lpips(tmp_path / "unused.pth", heads=heads)
    assert err.value.key == "model.autoencoder.loss.lpips_heads"
    assert str(heads) in err.value.message and "cannot be read" in err.value.message
