"""The join sample id -> annotation -> (cond, cond_map): flips, missing ids, dropout; box/mask runs."""
from __future__ import annotations

import pytest
import torch

from sgdm.annotation.store import write_store
from sgdm.models.config import GuidanceConfig
from sgdm.training.conditions import GuidanceLookup, apply_keep_mask, dropout_keep_mask
from tests.training.helpers import run_in_process, tiny_config


def _mask_store(path, ids, k=3):
    masks = torch.zeros(len(ids), 8, 8, dtype=torch.uint8)
    masks[:, :, :4] = 1
    masks[:, :, 4:] = 2
    masks[:, 0, 0] = 255  # ignore
    write_store(path, ids, {"mask": masks}, granularity="mask", num_classes=k)


def test_masks_and_boxes_of_flipped_samples_are_mirrored(tmp_path):
    ids = ["a", "b"]
    _mask_store(tmp_path / "mask", ids)
    lookup = GuidanceLookup(GuidanceConfig(kind="mask", num_classes=3), tmp_path / "mask")
    cond, cond_map = lookup(ids, torch.tensor([False, True]), (8, 8))
    assert cond.tolist() == [[0.0, 1.0, 1.0]] * 2
    assert torch.equal(cond_map[1], cond_map[0].flip(-1))
    assert cond_map[0, 1, 3, :4].tolist() == [1.0] * 4 and cond_map[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]

    write_store(tmp_path / "box", ids, {"cluster": torch.tensor([0, 2]), "box": torch.tensor([[0, 0, 0.5, 1.0]] * 2)},
                granularity="box", num_classes=3)
    lookup = GuidanceLookup(GuidanceConfig(kind="box", num_classes=3), tmp_path / "box")
    cond, cond_map = lookup(ids, torch.tensor([False, True]), (4, 4))
    assert cond.tolist() == [[1, 0, 0], [0, 0, 1]]
    assert cond_map[0, 0, 0].tolist() == [1, 1, 0, 0] and cond_map[1, 0, 0].tolist() == [0, 0, 1, 1]
    with pytest.raises(KeyError, match="no image id 'zz'.*sgdm-ldm annotate"):
        lookup(["zz"], torch.tensor([False]), (4, 4))


def test_dropout_is_drawn_over_the_global_batch_and_zeroes_both():
    keep = dropout_keep_mask(4000, 0.25, torch.Generator().manual_seed(1))
    assert torch.equal(keep, dropout_keep_mask(4000, 0.25, torch.Generator().manual_seed(1)))
    assert abs(float(keep.mean()) - 0.75) < 0.03
    cond, cond_map = apply_keep_mask(torch.ones(2, 3), torch.ones(2, 1, 2, 2), torch.tensor([1.0, 0.0]))
    assert cond.sum(1).tolist() == [3.0, 0.0] and cond_map.flatten(1).sum(1).tolist() == [4.0, 0.0]


@pytest.mark.parametrize("kind", ["box", "mask"])
def test_box_and_mask_guided_training_with_sample_grids(tmp_path, kind):
    from sgdm.config.core import from_dict
    from sgdm.data import DataConfig, build_dataset

    k = 3
    cfg = tiny_config(tmp_path, model={"guidance": {"kind": kind, "num_classes": k}},
                      annotation={"granularity": kind, "num_classes": k, "lost": {"num_clusters": k}},
                      train={"max_steps": 2, "sample_every": 2, "sample_scales": [2.0]})
    dataset = build_dataset(from_dict(DataConfig, cfg["data"]), train=False)
    ids = [dataset[i]["id"] for i in range(len(dataset))]
    if kind == "mask":
        _mask_store(cfg["annotation"]["store"], ids, k)
    else:
        n = len(ids)
        write_store(cfg["annotation"]["store"], ids, {"cluster": torch.arange(n) % k,
                                                      "box": torch.tensor([[0.1, 0.2, 0.6, 0.9]]).repeat(n, 1)},
                    granularity="box", num_classes=k)
    assert run_in_process(cfg) == 0
    assert (tmp_path / "runs" / "tiny" / "samples" / "step-00000002.png").is_file()


def test_a_box_without_annotation_gets_the_null_condition_and_no_grid_column(tmp_path):
    from sgdm.training.sample_grid import grid_conditions

    ids = ["none", "a", "b"]  # "none": the store's no-annotation marker (cluster -1, box zeros)
    box = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 1.0], [0.25, 0.25, 1.0, 1.0]])
    write_store(tmp_path / "box", ids, {"cluster": torch.tensor([-1, 0, 2]), "box": box}, granularity="box",
                num_classes=3)
    lookup = GuidanceLookup(GuidanceConfig(kind="box", num_classes=3), tmp_path / "box")
    for flipped in (torch.tensor([False, False, True]), torch.tensor([True, False, False])):
        cond, cond_map = lookup(ids, flipped, (4, 4))
        assert cond.device.type == "cpu" and cond_map.device.type == "cpu"
        assert cond[0].tolist() == [0.0, 0.0, 0.0] and not cond_map[0].any()  # the zeros guidance dropout gives
        assert cond[1:].sum(1).tolist() == [1.0, 1.0] and cond_map[1:].flatten(1).sum(1).min() > 0
    cond, cond_map = grid_conditions(lookup, "box", 3, 3, (4, 4))  # columns: a, b, a (never "none")
    assert cond.argmax(1).tolist() == [0, 2, 0] and cond_map.flatten(1).sum(1).min() > 0
