"""Ground-truth stores (``annotation.source: gt``): K is the dataset's number of classes, checked before
any image is read (shapes: 12 label / box classes, 13 mask values with the background)."""
import pytest

from sgdm.annotation.annotate import annotate
from sgdm.config.core import ConfigError

from .test_annotate import config


def unread_dataset(cfg, monkeypatch):
    """``cfg``'s dataset, every read of which fails: the check must come first."""
    from sgdm.data import build_dataset

    dataset = build_dataset(cfg.data, train=False)

    def no_reading(self, index):
        raise AssertionError(f"image {index} was read before K was checked")

    monkeypatch.setattr(type(dataset), "__getitem__", no_reading)
    return dataset


@pytest.mark.parametrize("granularity, k, key, classes", [
    ("label", 20, "annotation.num_classes", 12), ("box", 20, "annotation.lost.num_clusters", 12),
    ("mask", 20, "annotation.num_classes", 13)])
def test_more_classes_than_the_ground_truth_has_are_refused(tmp_path, shapes_cache, monkeypatch, granularity, k,
                                                             key, classes):
    """A class_list subset under a config made for all classes (K=100 for 10 classes) would store K one-hot
    slots of which most are never used; refused, naming the key and the dataset's count."""
    cfg = config(tmp_path, "unused.pth", shapes_cache, source="gt", num_classes=k, lost={"num_clusters": k})
    with pytest.raises(ConfigError, match=rf"{key}: {k} is more than the dataset's {classes} ground-truth classes.*"
                                          rf"{key}={classes}"):
        annotate(cfg, granularity, dataset=unread_dataset(cfg, monkeypatch), progress=False, log=lambda m: None)
    assert not (tmp_path / "store").exists()


def test_fewer_classes_than_the_ground_truth_has_are_refused_before_reading(tmp_path, shapes_cache, monkeypatch):
    cfg = config(tmp_path, "unused.pth", shapes_cache, source="gt", num_classes=4)
    with pytest.raises(ConfigError, match="annotation.num_classes: 4 is too small: the dataset has 12 ground-truth "
                                          "classes"):
        annotate(cfg, "label", dataset=unread_dataset(cfg, monkeypatch), progress=False, log=lambda m: None)
