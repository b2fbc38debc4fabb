"""Every shipped config validates, and the variants share network and budget with their base."""
from __future__ import annotations

import pathlib

import pytest

from sgdm.config.schema import load_experiment

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
NAMES = ["lsun_churches", "imagenet100", "imagenet100_gt_labels", "imagenet100_unguided", "voc_boxed",
         "voc_boxed_gt", "coco_stuff_segmented", "coco_stuff_segmented_gt", "shapes_cpu"]


@pytest.mark.parametrize("name", NAMES)
def test_config_validates(name):
    cfg = load_experiment(CONFIGS / f"{name}.yaml")
    assert cfg.run.name and cfg.train.max_steps > 0
    if name != "shapes_cpu":
        assert cfg.model.autoencoder.checkpoint is not None and cfg.data.root is not None


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_file_validates_with_the_unet_at_the_latent_size(path):
    cfg = load_experiment(path)
    assert cfg.model.unet.image_size * cfg.model.autoencoder.downsample_factor == cfg.data.size


@pytest.mark.parametrize("base, variant, kind, source", [
    ("imagenet100", "imagenet100_gt_labels", "label", "gt"),
    ("imagenet100", "imagenet100_unguided", "none", "self"),
    ("voc_boxed", "voc_boxed_gt", "box", "gt"),
    ("coco_stuff_segmented", "coco_stuff_segmented_gt", "mask", "gt"),
])
def test_variants_share_network_and_budget(base, variant, kind, source):
    a, b = load_experiment(CONFIGS / f"{base}.yaml"), load_experiment(CONFIGS / f"{variant}.yaml")
    assert (b.model.guidance.kind, b.model.guidance.source) == (kind, source)
    assert a.model.unet == b.model.unet and a.model.autoencoder == b.model.autoencoder
    assert a.train == b.train and a.diffusion == b.diffusion and a.data == b.data
    assert a.run.name != b.run.name


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_printed_config_loads_back_the_same(path, tmp_path):
    """What ``--print-config`` writes (and a run records) is the config itself."""
    from sgdm.config.core import dump_yaml
    from sgdm.config.schema import recorded_config

    cfg = load_experiment(path)
    printed = tmp_path / path.name
    printed.write_text(dump_yaml(recorded_config(cfg)))
    assert load_experiment(printed) == cfg


# LDM's published setups the comments name (CompVis latent-diffusion: models/ldm/lsun_churches256 and
# configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml; models/ldm/cin256, whose attention downsampling
# factors 4, 2, 1 are latent resolutions 8, 16, 32 of a 32x32 latent).
LDM = {
    "lsun_churches": dict(channels=192, channel_mult=[1, 2, 2, 4, 4], num_res_blocks=2,
                          attention_resolutions=[32, 16, 8, 4], num_heads=8, resblock_updown=True,
                          use_scale_shift_norm=True, betas=(0.0015, 0.0155), loss="l1", lr=5.0e-5, batch=96,
                          warmup=10000),
    "imagenet100": dict(channels=256, channel_mult=[1, 2, 4], num_res_blocks=2, attention_resolutions=[32, 16, 8],
                        num_head_channels=32, betas=(0.0015, 0.0195), loss="l2"),
}


@pytest.mark.parametrize("name", sorted(LDM))
def test_paper_configs_keep_ldms_network_and_schedule(name):
    cfg, want = load_experiment(CONFIGS / f"{name}.yaml"), dict(LDM[name])
    unet, d = cfg.model.unet, cfg.diffusion
    assert (d.linear_start, d.linear_end) == want.pop("betas") and d.schedule == "scaled_linear"
    assert d.loss == want.pop("loss") and d.timesteps == 1000
    if "lr" in want:
        assert (cfg.train.lr, cfg.train.batch_size, cfg.train.warmup_steps) == \
            (want.pop("lr"), want.pop("batch"), want.pop("warmup"))
    assert {k: getattr(unet, k) for k in want} == want
    assert (unet.in_channels, unet.image_size, cfg.data.size) == (4, 32, 256)  # kl-f8 latents of 256 px images


@pytest.mark.parametrize("image_size", [16, 30, 64])
def test_a_unet_side_that_is_not_the_latent_side_is_named_as_the_cause(image_size):
    # the UNet section validates first: 16 leaves attention_resolutions' 32 unreachable, 30 does not
    # divide by its levels; each is only a consequence of image_size not being data.size / 8
    with pytest.raises(Exception) as info:
        load_experiment(CONFIGS / "lsun_churches.yaml", [f"model.unet.image_size={image_size}"])
    assert str(info.value) == (f"model.unet.image_size: must equal the latent side 32 = data.size 256 / 8 (the "
                               f"downsampling of model.autoencoder.ch_mult), got {image_size}")


@pytest.mark.parametrize("override, key", [
    ("model.unet.attention_resolutions=[3]", "model.unet.attention_resolutions[0]"),  # image_size is right
    ("model.unet.channel_mult=[1,2,2,2,2,2,2]", "model.unet.image_size"),  # 32 is right, it has no 7 levels
])
def test_a_unet_error_is_kept_when_the_side_is_not_its_cause(override, key):
    from sgdm.config.core import ConfigError

    with pytest.raises(ConfigError) as info:
        load_experiment(CONFIGS / "lsun_churches.yaml", [override])
    assert info.value.key == key and "latent side" not in info.value.message
