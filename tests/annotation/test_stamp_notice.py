"""Before extraction every image file is stat-ed (its size and date, to tell a changed file on a rerun);
on a large dataset that silent phase is announced, once, on rank 0."""
from sgdm.annotation import annotate as annotate_module
from sgdm.annotation.annotate import annotate

from .test_annotate import config


def test_checking_many_files_is_announced(tmp_path, tiny_weights, shapes_cache, monkeypatch):
    monkeypatch.setattr(annotate_module, "_STAMP_NOTICE", 24, raising=False)  # "many": 24 files here
    messages = []
    annotate(config(tmp_path, tiny_weights, shapes_cache, num_images=24, shard_size=8), "label", progress=False,
             log=messages.append)
    assert [m for m in messages if m.startswith("annotate: checking")] == [
        "annotate: checking the size and date of the dataset's 24 image files (to tell a changed file on a rerun) ..."]


def test_a_few_files_are_checked_without_a_word(tmp_path, tiny_weights, shapes_cache, monkeypatch):
    monkeypatch.setattr(annotate_module, "_STAMP_NOTICE", 25, raising=False)
    messages = []
    annotate(config(tmp_path, tiny_weights, shapes_cache, num_images=24, shard_size=8), "label", progress=False,
             log=messages.append)
    assert not [m for m in messages if m.startswith("annotate: checking")]
