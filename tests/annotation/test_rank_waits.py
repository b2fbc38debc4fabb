"""With several ranks, the others wait while rank 0 evaluates and writes the store (and, on a resume,
for the ranks with more shards left to extract): at barriers of a group whose timeout is
``WAIT_TIMEOUT``, not torch.distributed's default (10 minutes for NCCL, which killed the job at its
very end); a rank that fails makes the others stop instead of waiting for it. One process of a gloo
group of one stands in for the ranks (spawning two costs seconds)."""
import datetime

import pytest
import torch
import torch.distributed as dist

from sgdm.annotation import annotate as annotate_module
from sgdm.annotation.annotate import annotate

from .test_annotate import config


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_the_waits_outlast_the_default_timeout(tmp_path, tiny_weights, shapes_cache, monkeypatch, group_of_one):
    made, waited = [], []
    real_new_group, real_all_reduce = dist.new_group, dist.all_reduce

    def new_group(*args, **kwargs):
        group = real_new_group(*args, **kwargs)
        made.append((group, kwargs.get("timeout")))
        return group

    def all_reduce(tensor, *args, group=None, **kwargs):
        waited.append(group)
        return real_all_reduce(tensor, *args, group=group, **kwargs)

    monkeypatch.setattr(dist, "new_group", new_group)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    result = annotate(config(tmp_path, tiny_weights, shapes_cache, num_images=24, shard_size=8), "label",
                      progress=False, log=lambda m: None)
    assert result.num_images == 24
    assert len(made) == 1 and made[0][1] >= datetime.timedelta(hours=1)
    assert waited.count(made[0][0]) == 2  # after extraction and after the store is written


def test_a_failed_rank_stops_the_others(tmp_path, tiny_weights, shapes_cache, monkeypatch, group_of_one):
    real_all_reduce = dist.all_reduce

    def other_rank_failed(tensor, *args, group=None, **kwargs):
        out = real_all_reduce(tensor, *args, group=group, **kwargs)
        if group is not None:  # annotate's waits: the other rank's flag says it failed
            tensor.add_(1)
        return out

    monkeypatch.setattr(dist, "all_reduce", other_rank_failed)
    with pytest.raises(annotate_module.RankFailed, match="another rank failed"):
        annotate(config(tmp_path, tiny_weights, shapes_cache, num_images=24, shard_size=8), "label", progress=False,
                 log=lambda m: None)
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_ground_truth_is_read_by_rank_0_alone(tmp_path, shapes_cache, monkeypatch, group_of_one):
    """Every rank read the whole dataset's ground truth and wrote the same store over the others'."""
    from sgdm.data import build_dataset

    cfg = config(tmp_path, "unused.pth", shapes_cache, num_images=24, source="gt", num_classes=12)
    dataset = build_dataset(cfg.data, train=False)

    def no_reading(self, index):
        raise AssertionError(f"rank 1 read image {index}")

    monkeypatch.setattr(type(dataset), "__getitem__", no_reading)
    monkeypatch.setattr(annotate_module, "rank_world", lambda: (1, 2))
    result = annotate(cfg, "label", dataset=dataset, progress=False, log=lambda m: None)
    assert result.num_images == 0 and not (tmp_path / "store" / "manifest.json").exists()
