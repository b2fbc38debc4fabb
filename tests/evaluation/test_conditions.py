"""Evaluation conditions drawn from the store: a box store's rows without annotation are never drawn."""
import pytest
import torch

from sgdm.annotation.store import write_store
from sgdm.evaluation.conditions import draw_conditions


def test_draw_conditions_never_draws_an_unannotated_image(tmp_path):
    ids = ["none1", "a", "none2", "b"]  # cluster -1 with box zeros: the no-annotation marker
    box = torch.tensor([[0.0] * 4, [0.0, 0.0, 0.5, 1.0], [0.0] * 4, [0.25, 0.25, 1.0, 1.0]])
    write_store(tmp_path / "box", ids, {"cluster": torch.tensor([-1, 1, -1, 2]), "box": box}, granularity="box",
                num_classes=3)
    conds = draw_conditions("box", tmp_path / "box", 200, torch.Generator().manual_seed(0))
    assert set(conds.clusters.tolist()) == {1, 2}  # both annotated images, never -1
    assert (conds.boxes[:, 2] > 0).all()
    assert conds.pipeline_kwargs()["cluster"] == conds.clusters.tolist()

    write_store(tmp_path / "empty", ["none"], {"cluster": torch.tensor([-1]), "box": torch.zeros(1, 4)},
                granularity="box", num_classes=3)
    with pytest.raises(ValueError, match="none of its 1 images is annotated"):
        draw_conditions("box", tmp_path / "empty", 4, torch.Generator().manual_seed(0))


def test_draw_conditions_of_a_fully_annotated_store_are_unchanged(tmp_path):
    write_store(tmp_path / "label", ["a", "b", "c"], {"cluster": torch.tensor([0, 1, 2])}, granularity="label",
                num_classes=3)
    expected = torch.randint(3, (16,), generator=torch.Generator().manual_seed(5))  # the draw before the marker
    conds = draw_conditions("label", tmp_path / "label", 16, torch.Generator().manual_seed(5))
    assert conds.clusters.tolist() == expected.tolist()
