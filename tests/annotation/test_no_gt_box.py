"""Box ground truth of an image with no box left after the centre crop: the store's no-annotation
marker (cluster -1, box zeros), never class 0 with a whole-image box; and the consumers of the marker."""
import types

import pytest
import torch

from sgdm.annotation.annotate import annotate
from sgdm.annotation.config import AnnotationConfig
from sgdm.annotation.gallery import write_gallery
from sgdm.annotation.ground_truth import ground_truth_records
from sgdm.annotation.store import NO_ANNOTATION, AnnotationStore, is_annotated, write_store
from sgdm.config.core import ConfigError, from_dict
from sgdm.data import DataConfig, build_dataset
from tests.data import fixtures
from tests.data.fixtures import VOC_OBJECT, VOC_XML, sample_rgb


def voc_with_unboxed_images(root):
    """make_voc's 3 images plus 000004 (no object), 000005 (only a difficult box) and 000006 (its
    object lies outside the 30-pixel centre crop of the 40x30 image, columns 5..35)."""
    from PIL import Image

    fixtures.make_voc(root)
    extra = {"000004": [], "000005": [("dog", 1, (3, 4, 30, 20))], "000006": [("cat", 0, (1, 1, 4, 30))]}
    for image_id, objs in extra.items():
        Image.fromarray(sample_rgb(40, 30)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        xml = "".join(VOC_OBJECT.format(name=n, difficult=d, x1=b[0], y1=b[1], x2=b[2], y2=b[3]) for n, d, b in objs)
        (root / "Annotations" / f"{image_id}.xml").write_text(VOC_XML.format(id=image_id, w=40, h=30, objects=xml))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n000003\n000004\n000005\n000006\n")


def gt_box_store(tmp_path):
    root = tmp_path / "VOC2007"
    voc_with_unboxed_images(root)
    data = from_dict(DataConfig, {"dataset": "voc", "root": str(root), "split": "trainval", "size": 30,
                                  "keep_difficult": False, "num_workers": 0}, "data")
    annotation = from_dict(AnnotationConfig, {"store": str(tmp_path / "store"), "source": "gt", "granularity": "box",
                                              "num_classes": 20, "lost": {"num_clusters": 20}}, "annotation")
    messages = []
    annotate(types.SimpleNamespace(data=data, annotation=annotation), progress=False, log=messages.append)
    return AnnotationStore.open(tmp_path / "store"), data, messages


def test_an_image_without_gt_box_gets_the_marker_not_class_0(tmp_path):
    store, _, messages = gt_box_store(tmp_path)
    unboxed = ["000004", "000005", "000006"]
    for image_id in unboxed:
        record = store.get(image_id)
        assert record["cluster"] == NO_ANNOTATION == -1 and record["box"].tolist() == [0.0] * 4
        assert not is_annotated(record)
    assert store.get("000001")["cluster"] == 11 and is_annotated(store.get("000001"))  # dog
    assert store.annotated().tolist() == [True, True, True, False, False, False]
    assert store.manifest["images_without_gt_box"] == 3 and store.manifest["ids_without_gt_box"] == unboxed
    assert any("3 of 6 images have no ground-truth box" in m and "'000004'" in m for m in messages)


def test_gallery_lists_unannotated_images_last_without_a_box(tmp_path):
    store, data, _ = gt_box_store(tmp_path)
    page = write_gallery(store, build_dataset(data, train=False), tmp_path / "g.html", max_clusters=1).read_text()
    assert page.count("<h2") == 2 and "no annotation (no ground-truth box) (3 images)" in page
    assert page.index("cluster ") < page.index("no annotation")


def test_box_records_accept_exactly_the_marker():
    gt = {"gt_boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "gt_box_count": torch.tensor([1, 0]),
          "gt_box_labels": torch.tensor([2]), "gt_label": torch.tensor([2, -1])}
    records, extra = ground_truth_records(gt, "box", 3, (8, 8), ["a", "b"])
    assert records["cluster"].tolist() == [2, -1] and records["box"][1].tolist() == [0.0] * 4
    assert extra == {"images_without_gt_box": 1, "ids_without_gt_box": ["b"]}
    with pytest.raises(ValueError, match="box class -2 is negative"):
        ground_truth_records({**gt, "gt_box_labels": torch.tensor([-2])}, "box", 3, (8, 8), ["a", "b"])
    with pytest.raises(ConfigError, match="lost.num_clusters: 2 is too small"):
        ground_truth_records(gt, "box", 2, (8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="none of the 1 images has a ground-truth box"):
        ground_truth_records({**gt, "gt_boxes": torch.zeros(0, 4), "gt_box_count": torch.tensor([0]),
                              "gt_box_labels": torch.zeros(0, dtype=torch.long)}, "box", 3, (8, 8), ["b"])


def test_write_store_refuses_other_negatives_and_a_marker_with_a_box(tmp_path):
    box = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    write_store(tmp_path / "ok", ["a", "b"], {"cluster": torch.tensor([1, -1]), "box": box}, granularity="box",
                num_classes=2)
    with pytest.raises(ValueError, match="got -2"):
        write_store(tmp_path / "s", ["a", "b"], {"cluster": torch.tensor([1, -2]), "box": box}, granularity="box",
                    num_classes=2)
    with pytest.raises(ValueError, match=r"must have box \[0, 0, 0, 0\]"):
        write_store(tmp_path / "s", ["a", "b"], {"cluster": torch.tensor([-1, 1]), "box": box}, granularity="box",
                    num_classes=2)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\), got -1"):  # label stores have no marker
        write_store(tmp_path / "s", ["a", "b"], {"cluster": torch.tensor([1, -1])}, granularity="label", num_classes=2)
