import numpy as np
import pytest
import torch

from sgdm.annotation.gallery import render, write_gallery
from sgdm.annotation.store import write_store


def grey(n=1):
    return torch.zeros(n, 3, 16, 16)  # [-1, 1] images: mid-grey


def test_render_box_outline():
    pil = np.asarray(render(grey()[0], {"cluster": 0, "box": torch.tensor([0.25, 0.25, 0.75, 0.75])}, size=16))
    assert tuple(pil[4, 8]) == (255, 220, 0)  # top edge of the box, at 0.25 * 16
    assert tuple(pil[8, 8]) == (128, 128, 128)  # inside stays untouched
    assert tuple(pil[1, 1]) == (128, 128, 128)


def test_render_mask_blend_keeps_ignore_pixels():
    mask = torch.zeros(4, 4, dtype=torch.uint8)
    mask[:2] = 1
    mask[3, 3] = 255
    pil = np.asarray(render(grey()[0], {"mask": mask, "multi_hot": torch.ones(2)}, size=16, num_classes=2))
    assert not np.array_equal(pil[0, 0], pil[15, 0])  # class 1 and class 0 get different colours
    assert tuple(pil[15, 15]) == (128, 128, 128)  # ignore (255) is not painted


class FakeDataset:
    def __init__(self, ids):
        self.ids = ids

    def __getitem__(self, i):
        return {"image": grey()[0], "id": self.ids[i]}


def test_gallery_groups_by_cluster(tmp_path):
    ids = [f"im{i}" for i in range(6)]
    store = write_store(tmp_path / "s", ids, {"cluster": torch.tensor([2, 2, 2, 0, 0, 1])}, granularity="label", num_classes=3)
    out = write_gallery(store, FakeDataset(ids), tmp_path / "g.html", per_cluster=2)
    page = out.read_text()
    assert page.index("cluster 2 (3 images)") < page.index("cluster 0 (2 images)") < page.index("cluster 1 (1 image)")
    assert page.count("<img") == 2 + 2 + 1  # at most per_cluster each
    with pytest.raises(ValueError, match="6 ids of store .* are not in the dataset"):
        write_gallery(store, FakeDataset(["other"]), tmp_path / "g2.html")


def test_max_clusters_keeps_the_largest_and_none_keeps_all(tmp_path):
    ids = [f"im{i}" for i in range(6)]
    store = write_store(tmp_path / "s", ids, {"cluster": torch.tensor([2, 2, 2, 0, 0, 1])}, granularity="label", num_classes=3)
    page = write_gallery(store, FakeDataset(ids), tmp_path / "g.html", max_clusters=2).read_text()
    assert "cluster 2 " in page and "cluster 0 " in page and "cluster 1 " not in page
    page = write_gallery(store, FakeDataset(ids), tmp_path / "g.html", max_clusters=None).read_text()
    assert page.count("<h2") == 3
    with pytest.raises(ValueError, match="max_clusters must be >= 1"):
        write_gallery(store, FakeDataset(ids), tmp_path / "g.html", max_clusters=0)
