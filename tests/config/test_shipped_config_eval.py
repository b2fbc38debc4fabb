"""The evaluation settings of the shipped paper configs measure what their comments say."""
from __future__ import annotations

import pathlib

import pytest

from sgdm.config.schema import load_experiment

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
# CMC's ImageNet-100 train split: 126,689 images, about 1,300 a class, listed class by class
IMAGENET100_TRAIN_IMAGES = 126_689


@pytest.mark.parametrize("name", ["imagenet100.yaml", "imagenet100_gt_labels.yaml", "imagenet100_unguided.yaml"])
def test_the_imagenet100_reference_set_covers_every_class(name):
    # The reference set is the first eval.reference_n training images in id order, which for
    # imagenet100 is class order: the default 50,000 held the first 39 of the 100 classes only,
    # while the samples are drawn for every class, so FID / KID measured a class mismatch.
    cfg = load_experiment(CONFIGS / name)
    assert cfg.data.dataset == "imagenet100"
    assert cfg.eval.reference_n >= IMAGENET100_TRAIN_IMAGES, name
