"""Feature shards made at one precision are never finished at another (bf16 and fp32 features mixed)."""
import pytest

from sgdm.annotation import annotate as annotate_module
from sgdm.annotation.annotate import annotate
from sgdm.config.core import ConfigError

from .test_annotate import config


def test_a_resume_at_another_precision_is_refused_and_a_finished_cache_is_reused(tmp_path, tiny_weights,
                                                                                 shapes_cache, monkeypatch):
    quiet = dict(progress=False, log=lambda m: None)
    real_save = annotate_module.FeatureCache.save
    saved = []

    def crash_after_two(self, shard, *args, **kwargs):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(shard)
        real_save(self, shard, *args, **kwargs)

    monkeypatch.setattr(annotate_module.FeatureCache, "save", crash_after_two)
    with pytest.raises(KeyboardInterrupt):  # precision auto on the CPU: fp32
        annotate(config(tmp_path, tiny_weights, shapes_cache), **quiet)
    monkeypatch.setattr(annotate_module.FeatureCache, "save", real_save)
    with pytest.raises(ConfigError, match=r"^annotation\.precision: 2 feature shard\(s\) in .*work were extracted at "
                                          r"fp32, this run extracts at bf16"):
        annotate(config(tmp_path, tiny_weights, shapes_cache, precision="bf16"), **quiet)
    annotate(config(tmp_path, tiny_weights, shapes_cache, precision="fp32"), **quiet)  # finishes them alike
    # every shard done: another precision extracts nothing, so the features are reused (e.g. re-clustering)
    annotate(config(tmp_path, tiny_weights, shapes_cache, precision="bf16", num_classes=3), **quiet)
