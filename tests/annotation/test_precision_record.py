"""The precision features are extracted at: one rule (``annotation.precision`` on a device) for annotate and
adherence, and the store records what its features were extracted at, so that evaluation extracts the
samples alike."""
import json

import pytest
import torch

from sgdm.annotation.annotate import annotate
from sgdm.annotation.features import extraction_precision
from sgdm.annotation.store import MANIFEST, AnnotationStore

from .test_annotate import config


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cuda", "bf16"), ("auto", "cpu", "fp32"), ("fp32", "cuda", "fp32"), ("fp32", "cpu", "fp32"),
    ("bf16", "cpu", "bf16"), ("bf16", torch.device("cuda:1"), "bf16"),
])
def test_the_precision_rule(setting, device, expected):
    assert extraction_precision(setting, device) == expected


def test_an_unknown_precision_names_the_key():
    with pytest.raises(ValueError, match=r"annotation\.precision: expected auto, fp32 or bf16, got 'fp16'"):
        extraction_precision("fp16", "cpu")


def test_the_store_records_its_features_precision(tmp_path, tiny_weights, shapes_cache):
    quiet = dict(progress=False, log=lambda m: None)
    annotate(config(tmp_path, tiny_weights, shapes_cache, num_images=16, precision="bf16"), "label", **quiet)
    store = AnnotationStore.open(tmp_path / "store")
    assert store.manifest["feature_precision"] == "bf16"
    # the features are reused at any precision once every shard is done: the store records theirs, not the setting
    annotate(config(tmp_path, tiny_weights, shapes_cache, num_images=16, precision="auto", num_classes=3), "label",
             **quiet)
    assert AnnotationStore.open(tmp_path / "store").manifest["feature_precision"] == "bf16"
    annotate(config(tmp_path / "other", tiny_weights, shapes_cache, num_images=16), "label", **quiet)  # auto, CPU
    assert AnnotationStore.open(tmp_path / "other" / "store").manifest["feature_precision"] == "fp32"


def test_a_store_that_gained_its_precision_record_matches_its_earlier_digest(tmp_path, tiny_weights, shapes_cache):
    annotate(config(tmp_path, tiny_weights, shapes_cache, num_images=16), "label", progress=False, log=lambda m: None)
    store = AnnotationStore.open(tmp_path / "store")
    manifest = dict(store.manifest)
    del manifest["feature_precision"]  # as an earlier annotate wrote it
    (store.path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    earlier = AnnotationStore.open(store.path).content_digest()
    (store.path / MANIFEST).write_text(json.dumps(store.manifest, indent=1))
    assert AnnotationStore.open(store.path).matches_digest(earlier)
