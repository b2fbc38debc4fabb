"""A mask store re-made at the same path never pairs the old masks with the new segmenter."""
import pytest

from sgdm.annotation import annotate as annotate_module
from sgdm.annotation.annotate import annotate
from sgdm.annotation.store import AnnotationStore

from .test_annotate import config


def test_a_crash_after_the_new_segmenter_is_saved_leaves_no_store_with_the_old_masks(tmp_path, tiny_weights,
                                                                                     shapes_cache, monkeypatch):
    quiet = dict(progress=False, log=lambda m: None)
    stego = {"epochs": 1, "batch_size": 16, "dim": 8, "feature_samples": 0, "method": "kmeans"}
    annotate(config(tmp_path, tiny_weights, shapes_cache, num_classes=5, stego=stego), "mask", **quiet)
    assert AnnotationStore.open(tmp_path / "store").segmenter().num_classes == 5

    def interrupted(*args, **kwargs):  # e.g. Ctrl-C during a long --evaluate, before the store is rewritten
        raise KeyboardInterrupt

    monkeypatch.setattr(annotate_module, "evaluate_records", interrupted)
    with pytest.raises(KeyboardInterrupt):
        annotate(config(tmp_path, tiny_weights, shapes_cache, num_classes=3, stego=stego), "mask", evaluate=True,
                 **quiet)
    # the segmenter file now holds the new f (K=3); the old manifest (K=5 masks) must not survive beside it
    with pytest.raises(FileNotFoundError, match="unfinished run"):
        AnnotationStore.open(tmp_path / "store")
