import pytest

from sgdm.config.core import ConfigError, from_dict
from sgdm.models.config import AutoencoderConfig, GuidanceConfig, ModelConfig, UNetConfig


def test_defaults_are_the_churches_ldm():
    cfg = from_dict(ModelConfig, {"guidance": {"kind": "label", "num_classes": 100}})
    assert cfg.unet.channels == 192 and cfg.unet.channel_mult == [1, 2, 2, 4, 4]
    assert cfg.unet.attention_resolutions == [32, 16, 8, 4] and cfg.autoencoder.downsample_factor == 8
    assert cfg.guidance.drop_prob == 0.1


@pytest.mark.parametrize("section, cls, data, key, text", [
    ("unet", UNetConfig, {"attention_resolutions": [32, 3]}, "unet.attention_resolutions[1]", "not reachable"),
    ("unet", UNetConfig, {"channels": 40}, "unet.norm_groups", "not divisible"),
    ("unet", UNetConfig, {"num_heads": 5}, "unet.num_heads", "not divisible"),
    ("unet", UNetConfig, {"num_head_channels": 100}, "unet.num_head_channels", "not divisible"),
    ("unet", UNetConfig, {"num_head_channels": 0}, "unet.num_head_channels", "-1"),
    ("unet", UNetConfig, {"image_size": 20}, "unet.image_size", "not divisible"),
    ("unet", UNetConfig, {"channel_mult": []}, "unet.channel_mult", "at least one"),
    ("unet", UNetConfig, {"dropout": 1.5}, "unet.dropout", "[0, 1)"),
    ("unet", UNetConfig, {"cond_resize": "bilinear"}, "unet.cond_resize", "one of"),
    ("guidance", GuidanceConfig, {"kind": "label"}, "guidance.num_classes", "must be > 0"),
    ("guidance", GuidanceConfig, {"kind": "mask", "num_classes": 3, "drop_prob": 2}, "guidance.drop_prob", "[0, 1]"),
    ("guidance", GuidanceConfig, {"kind": "boxes"}, "guidance.kind", "one of"),
    ("autoencoder", AutoencoderConfig, {"attn_resolutions": [7]}, "autoencoder.attn_resolutions[0]", "not a level"),
    ("autoencoder", AutoencoderConfig, {"ch": 100}, "autoencoder.norm_groups", "not divisible"),
    ("autoencoder", AutoencoderConfig, {"loss": {"disc_start": -1}}, "autoencoder.loss.disc_start", ">= 0"),
    ("autoencoder", AutoencoderConfig, {"scale_factor": 0.0}, "autoencoder.scale_factor", "> 0"),
    ("autoencoder", AutoencoderConfig, {"scale_factor": float("inf")}, "autoencoder.scale_factor", "finite"),
    ("autoencoder", AutoencoderConfig, {"loss": {"kl_weight": float("nan")}}, "autoencoder.loss.kl_weight", "finite"),
    ("autoencoder", AutoencoderConfig, {"loss": {"disc_weight": float("inf")}}, "autoencoder.loss.disc_weight",
     "finite"),
    ("autoencoder", AutoencoderConfig, {"loss": {"logvar_init": float("nan")}}, "autoencoder.loss.logvar_init",
     "finite"),
    ("autoencoder", AutoencoderConfig, {"in_channels": 1}, "autoencoder.in_channels", "must be 3 (RGB"),
    ("autoencoder", AutoencoderConfig, {"out_ch": 4}, "autoencoder.out_ch", "must be 3 (RGB"),
])
def test_bad_values_name_the_key(section, cls, data, key, text):
    with pytest.raises(ConfigError) as err:
        from_dict(cls, data, section)
    assert err.value.key == key
    assert text in err.value.message


@pytest.mark.parametrize("data, key", [
    ({"unet": {"in_channels": 3, "out_channels": 3}}, "model.unet.in_channels"),
    ({"unet": {"out_channels": 8}}, "model.unet.out_channels"),
])
def test_model_cross_checks(data, key):
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, data, "model")
    assert err.value.key == key


def test_unet_constructor_validates_too():
    from sgdm.models.unet import UNet

    with pytest.raises(ConfigError) as err:
        UNet(UNetConfig(channels=32, norm_groups=8, channel_mult=[1, 2], image_size=8, attention_resolutions=[2]))
    assert err.value.key == "attention_resolutions[0]"
