"""K larger than what can be clustered is refused naming the config key, not as kmeans' internal N."""
import pytest
import torch

from sgdm.annotation.annotate import annotate
from sgdm.config.core import ConfigError

from .test_annotate import SkipsOne, config


class FirstImages(torch.utils.data.Dataset):
    def __init__(self, inner, n):
        self.inner, self.ids = inner, inner.ids[:n]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.inner[i]


def test_k_above_the_readable_images_names_the_key(tmp_path, tiny_weights, shapes_cache):
    from sgdm.data import build_dataset

    cfg = config(tmp_path, tiny_weights, shapes_cache, num_images=20, num_classes=20)
    dataset = SkipsOne(build_dataset(cfg.data, train=False))  # 20 images, one unreadable: 19 to cluster
    with pytest.raises(ConfigError, match=r"^annotation\.num_classes: K=20 clusters is more than the 19 images "
                                          r"that could be read \(1 of the dataset's 20 could not\)"):
        annotate(cfg, dataset=dataset, progress=False, log=lambda m: None)


def test_mask_k_above_the_patches_names_the_key(tmp_path, tiny_weights, shapes_cache):
    from sgdm.data import build_dataset

    cfg = config(tmp_path, tiny_weights, shapes_cache, num_images=20, num_classes=20,
                 stego={"method": "kmeans", "batch_size": 16})
    dataset = FirstImages(build_dataset(cfg.data, train=False), 1)  # one image: a 4 x 4 patch grid
    with pytest.raises(ConfigError, match=r"^annotation\.num_classes: K=20 segment classes is more than the 16 "
                                          r"patches of the 1 image"):
        annotate(cfg, "mask", dataset=dataset, progress=False, log=lambda m: None)


def test_mask_granularity_given_to_annotate_refuses_more_classes_than_uint8_maps_hold(tmp_path, tiny_weights,
                                                                                       shapes_cache):
    # the config says label (K=300 is fine there); annotate(cfg, "mask") / --granularity mask must not
    # store class 300 as 44 and class 255 as "ignore"
    cfg = config(tmp_path, tiny_weights, shapes_cache, num_classes=300, stego={"method": "kmeans", "batch_size": 16})
    assert cfg.annotation.granularity == "label"
    with pytest.raises(ConfigError, match=r"^annotation\.num_classes: masks are stored as uint8 class maps: at most "
                                          r"255 classes, got 300"):
        annotate(cfg, "mask", progress=False, log=lambda m: None)
