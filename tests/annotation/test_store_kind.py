"""``annotation.store`` of one granularity is never replaced by a store of another: ``annotate CONFIG
--granularity label`` on a box config warns naming both, and a complete box store there is refused (with
or without its feature cache ``work/``) instead of being replaced by a label store that training refuses;
a feature cache made for another granularity says so in the config's terms."""
import json

import pytest
import torch

from sgdm.annotation.annotate import annotate
from sgdm.annotation.cache import FeatureCache
from sgdm.annotation.store import StoreMismatchError, write_store
from sgdm.cli.main import main
from sgdm.config.core import ConfigError

from .test_annotate import config
from .test_cli import write_config


def box_store(path, n=4):
    write_store(path, [f"id{i}" for i in range(n)], {"cluster": torch.zeros(n, dtype=torch.long),
                                                     "box": torch.tensor([[0.1, 0.1, 0.5, 0.5]]).repeat(n, 1)},
                granularity="box", num_classes=5, shard_size=8, extra={"source": "self"})
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.parametrize("with_cache", [False, True])
def test_a_store_of_another_granularity_is_not_replaced(tmp_path, tiny_weights, shapes_cache, with_cache):
    store = tmp_path / "store"
    manifest = box_store(store)
    if with_cache:  # features of the box run beside it
        FeatureCache(store / "work", {"extract": "cls+lost(k=6,keys)"})
    cfg = config(tmp_path, tiny_weights, shapes_cache, num_images=24, shard_size=8, granularity="box")
    with pytest.raises(ConfigError, match=rf"annotation.store: {store} holds box annotations .* this run makes label "
                                          r"annotations.*annotation.granularity box.*another directory"):
        annotate(cfg, "label", progress=False, log=lambda m: None)
    assert json.loads((store / "manifest.json").read_text()) == manifest


def test_a_store_of_the_same_granularity_is_made_again(tmp_path, tiny_weights, shapes_cache):
    """Re-clustering with other settings (another K) at the same path stays the way to redo a store."""
    store = tmp_path / "store"
    box_store(store)
    cfg = config(tmp_path, tiny_weights, shapes_cache, num_images=24, shard_size=8)
    assert annotate(cfg, "box", progress=False, log=lambda m: None).num_images == 24


def test_cli_granularity_other_than_the_configs_is_warned(tmp_path, tiny_weights, shapes_cache, capsys):
    cfg = write_config(tmp_path / "exp.yaml", tmp_path / "store", tiny_weights, shapes_cache)  # box
    assert main(["annotate", str(cfg), "--granularity", "label", "annotation.num_classes=3", "--no-progress",
                 f"annotation.store={tmp_path / 'labels'}"]) == 0
    err = capsys.readouterr().err
    assert "--granularity label differs from annotation.granularity box" in err
    assert f"{tmp_path / 'labels'}" in err and "annotation.granularity=label model.guidance.kind=label" in err


def test_cache_of_another_granularity_says_which_setting_differs(tmp_path):
    FeatureCache(tmp_path / "work", {"backbone": "vit", "extract": "cls+lost(k=100,keys)"})
    with pytest.raises(StoreMismatchError) as info:
        FeatureCache(tmp_path / "work", {"backbone": "vit", "extract": "cls"})
    message = str(info.value)
    assert "extract differ; they were extract=cls+lost(k=100,keys)" in message  # as before
    assert "this run extracts cls: extract is what annotation.granularity extracts (label: cls; box: cls+lost" \
        in message
