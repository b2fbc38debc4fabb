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
