"""Each dataset kind names the files an item is read from, and their sizes are taken with one stat each, in
index order (what a run records to notice an image replaced in place: sgdm.data.files)."""
import pytest

from sgdm.data import build_dataset
from sgdm.data.files import files_hash, item_sizes
from tests.data import fixtures
from tests.data.test_datasets import cfg


def test_item_sizes_follow_the_index_order_across_the_threads_chunks(tmp_path, monkeypatch):
    import sgdm.data.files as files

    monkeypatch.setattr(files, "_CHUNK", 2)  # 7 items: 4 tasks, the last one short
    root = tmp_path / "images"
    root.mkdir()
    for i in range(7):
        (root / f"{i}.png").write_bytes(fixtures.encode(fixtures.sample_rgb(8 + i, 8, seed=i), "PNG"))
    dataset = build_dataset(cfg(dataset="image_folder", root=root), train=False)
    assert item_sizes(dataset) == [((root / f"{i}.png").stat().st_size,) for i in range(7)]


def test_a_file_replaced_under_its_name_changes_the_digest_and_a_missing_one_has_no_size(tmp_path):
    list_file = fixtures.make_list_layout(tmp_path)  # names missing.jpg, which is not there
    config = cfg(dataset="lsun_list", root=tmp_path / "images", list_file=list_file)
    before = build_dataset(config, train=False)
    sizes = item_sizes(before)
    assert sizes[3] == (None,) and all(isinstance(s, int) for (s,) in sizes[:3])
    (tmp_path / "images" / "c.JPEG").write_bytes(fixtures.encode(fixtures.sample_rgb(50, 40, seed=9), "JPEG"))
    after = build_dataset(config, train=False)  # a new start: sizes are taken once per dataset object
    assert after.ids == before.ids and files_hash(after.ids, item_sizes(after)) != files_hash(before.ids, sizes)


def test_voc_items_name_their_annotation_and_mask_and_coco_stuff_its_mask(tmp_path):
    """A box or mask file edited in place changes the sample as much as its image."""
    fixtures.make_voc(tmp_path / "VOC2007")
    voc = build_dataset(cfg(dataset="voc", root=tmp_path / "VOC2007", split="trainval"), train=False)
    root = tmp_path / "VOC2007"
    assert voc.item_files(2) == (str(root / "JPEGImages" / "000003.jpg"), str(root / "Annotations" / "000003.xml"),
                                 str(root / "SegmentationClass" / "000003.png"))
    assert item_sizes(voc)[2][2] is None and None not in item_sizes(voc)[0]  # 000003 has no mask PNG
    ids = fixtures.make_coco_stuff(tmp_path / "stuff")
    stuff = build_dataset(cfg(dataset="coco_stuff27", root=tmp_path / "stuff"), train=False)
    assert stuff.item_files(1) == (str(tmp_path / "stuff/images/train2017" / f"{ids[1]}.jpg"),
                                   str(tmp_path / "stuff/annotations/train2017" / f"{ids[1]}.png"))
    ann, list_file = fixtures.make_coco20k(tmp_path / "coco")
    coco = build_dataset(cfg(dataset="coco20k", root=tmp_path / "coco", list_file=list_file), train=False)
    assert coco.item_files(0) == (coco.source(0),)


@pytest.mark.parametrize("kind", ["shapes", "lsun_lmdb"])
def test_datasets_without_files_per_item_have_no_sizes(tmp_path, kind):
    if kind == "lsun_lmdb":
        pytest.importorskip("lmdb")
        fixtures.make_lsun_lmdb(tmp_path / "lmdb", bad=False)
        config = cfg(dataset="lsun_lmdb", root=tmp_path / "lmdb")
    else:
        config = cfg(dataset="shapes", shapes={"num_images": 4, "image_size": 16, "cache_dir": str(tmp_path)})
    assert item_sizes(build_dataset(config, train=False)) is None
