"""Each real dataset format, read from a tiny fixture; bad files under skip and raise."""
import logging
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sgdm.config import ConfigError, from_dict
from sgdm.data import BadImageError, DataConfig, build_dataset, collate_samples
from sgdm.data.coco import STUFF27_CLASSES, fine_to_coarse_lut
from sgdm.data.folders import imagenet100_wnids
from sgdm.data.voc import VOC_CLASSES
from tests.data import fixtures


def cfg(**kwargs) -> DataConfig:
    kwargs = {k: str(v) if hasattr(v, "as_posix") else v for k, v in kwargs.items()}
    return from_dict(DataConfig, {"size": 16, "num_workers": 0, **kwargs}, "data")


# ---- image folder -----------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    good = fixtures.write_unusual(root / "good")
    bad = fixtures.write_bad(root / "bad")
    (root / "README.txt").write_text("not listed: wrong extension")
    return root, good, bad


def test_image_folder_reads_every_image_file_in_sorted_order(folder):
    root, good, bad = folder
    ds = build_dataset(cfg(dataset="image_folder", root=root), train=False)
    expected = sorted(p.relative_to(root).as_posix() for p in [*good.values(), *bad.values()])
    assert ds.ids == expected  # upper-case extensions included, README ignored
    assert "good/UPPER.JPG" in ds.ids


def test_skip_returns_none_logs_and_counts_every_bad_file(folder, caplog):
    root, good, bad = folder
    ds = build_dataset(cfg(dataset="image_folder", root=root, on_bad_image="skip"), train=False)
    with caplog.at_level(logging.WARNING, logger="sgdm.data.base"):
        samples = [ds[i] for i in range(len(ds))]
    bad_ids = {p.relative_to(root).as_posix() for p in bad.values()}
    assert [ds.ids[i] for i, s in enumerate(samples) if s is None] == sorted(bad_ids)
    assert all(s["id"] == ds.ids[i] for i, s in enumerate(samples) if s is not None)  # nothing substituted
    assert ds.num_skipped == len(bad) and {s.source for s in ds.skipped} == {str(p) for p in bad.values()}
    assert len([r for r in caplog.records if "skipping bad image" in r.message]) == len(bad)
    batch = collate_samples(samples)
    assert batch["num_skipped"] == len(bad) and len(batch["id"]) == len(good)
    # the next epochs read them again: still skipped, but recorded and logged once (the list grew every epoch)
    with caplog.at_level(logging.WARNING, logger="sgdm.data.base"):
        for epoch in (1, 2):
            ds.set_epoch(epoch)
            assert sum(ds[i] is None for i in range(len(ds))) == len(bad)
    assert ds.num_skipped == len(bad)
    assert len([r for r in caplog.records if "skipping bad image" in r.message]) == len(bad)
    assert collate_samples([None, None]) is None


def test_raise_names_the_file_and_index(folder):
    root, _, bad = folder
    ds = build_dataset(cfg(dataset="image_folder", root=root, on_bad_image="raise"), train=False)
    index = ds.ids.index("bad/empty.png")
    with pytest.raises(BadImageError) as info:
        ds[index]
    assert info.value.index == index and str(bad["zero_byte"]) in str(info.value)
    assert f"index {index}" in str(info.value)


def test_folder_labels(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        fixtures.Image.fromarray(fixtures.sample_rgb()).save(tmp_path / cls / "x.png")
    ds = build_dataset(cfg(dataset="image_folder", root=tmp_path, folder_labels=True), train=False)
    assert ds.class_names == ["cats", "dogs"] and [ds[i]["gt_label"] for i in range(2)] == [0, 1]


def test_missing_and_empty_roots_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.root: dataset root .*nowhere does not exist"):
        build_dataset(cfg(dataset="image_folder", root=tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"^data\.root: no images found under"):
        build_dataset(cfg(dataset="image_folder", root=tmp_path / "empty"))


# ---- LSUN -------------------------------------------------------------------------------------
def test_lsun_lmdb_webp_and_jpeg_values_and_a_bad_one(tmp_path):
    keys = fixtures.make_lsun_lmdb(tmp_path / "church_outdoor_train_lmdb")
    ds = build_dataset(cfg(dataset="lsun_lmdb", root=tmp_path / "church_outdoor_train_lmdb"), train=True, seed=0)
    assert ds.ids == sorted(keys)
    assert ds.check(0) is None and "cannot decode" in ds.check(len(ds) - 1).reason
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_samples)
    batches = list(loader)  # each worker opens its own LMDB environment
    assert sum(len(b["id"]) for b in batches) == 4 and sum(b["num_skipped"] for b in batches) == 1
    assert batches[0]["image"].shape == (3, 3, 16, 16)


def test_lsun_lmdb_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root: .*has no data\.mdb"):
        build_dataset(cfg(dataset="lsun_lmdb", root=tmp_path))
    fixtures.make_lsun_lmdb(tmp_path / "empty_lmdb", num_good=0, bad=False)
    with pytest.raises(ConfigError, match="holds no images"):
        build_dataset(cfg(dataset="lsun_lmdb", root=tmp_path / "empty_lmdb"))
    # the folder above the *_lmdb directory, and its data.mdb file: both name the directory to use
    with pytest.raises(ConfigError, match=r"has no data\.mdb; .*: .* holds .*/empty_lmdb$"):
        build_dataset(cfg(dataset="lsun_lmdb", root=tmp_path))
    with pytest.raises(ConfigError, match=r"data\.root: .*data\.mdb is the LMDB's data\.mdb file; point root at the "
                                          r"directory holding it: .*/empty_lmdb$"):
        build_dataset(cfg(dataset="lsun_lmdb", root=tmp_path / "empty_lmdb" / "data.mdb"))


def test_lsun_list_layout_reports_the_missing_file(tmp_path):
    list_file = fixtures.make_list_layout(tmp_path)
    ds = build_dataset(cfg(dataset="lsun_list", root=tmp_path / "images", list_file=list_file), train=False)
    assert ds.ids == ["sub/a.jpg", "sub/b.webp", "c.JPEG", "missing.jpg"]
    assert [ds.check(i) for i in range(3)] == [None] * 3
    assert ds.check(3).reason == "file does not exist" and ds.check(3).source.endswith("images/missing.jpg")
    with pytest.raises(ConfigError, match=r"data\.list_file: list file .* does not exist"):
        build_dataset(cfg(dataset="lsun_list", root=tmp_path / "images", list_file=tmp_path / "none.txt"))


# ---- ImageNet-100 -----------------------------------------------------------------------------
def test_imagenet100_keeps_only_listed_classes_with_their_index(tmp_path):
    wnids = imagenet100_wnids(None, "data")
    assert len(wnids) == 100 and len(set(wnids)) == 100
    chosen = [wnids[3], wnids[57]]
    fixtures.make_imagenet(tmp_path, chosen)
    for split in ("train", "val"):
        ds = build_dataset(cfg(dataset="imagenet100", root=tmp_path, split=split), train=False)
        assert len(ds) == 4 and all(i.split("/")[0] in chosen for i in ds.ids)
        assert sorted({ds[i]["gt_label"] for i in range(4)}) == [3, 57] and ds.num_classes == 100
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(ConfigError, match=r"data\.root: ImageNet val folder .* does not exist"):
        build_dataset(cfg(dataset="imagenet100", root=tmp_path, split="val"))
    fixtures.make_imagenet(tmp_path / "other", [])
    with pytest.raises(ConfigError, match="none of the 100 class folders"):
        build_dataset(cfg(dataset="imagenet100", root=tmp_path / "other", split="train"))


# ---- VOC --------------------------------------------------------------------------------------
def test_voc_boxes_labels_and_masks(tmp_path):
    root = tmp_path / "VOC2007"
    objects = fixtures.make_voc(root)
    ds = build_dataset(cfg(dataset="voc", root=root, split="trainval", size=30), train=False)  # 40x30: crop columns 5..35
    assert ds.ids == list(objects) and ds.mask_class_names[0] == "background"
    s = ds[1]
    # cat (21,2)-(40,15) in VOC corners -> pixel edges (20,1)-(40,15) -> crop shifts x by 5, clips at 30
    # person (1,16)-(8,30) -> (0,15)-(8,30) -> (0,15)-(3,30)
    assert s["gt_boxes"].tolist() == [[15.0, 1.0, 30.0, 15.0], [0.0, 15.0, 3.0, 30.0]]
    assert [VOC_CLASSES[c] for c in s["gt_box_labels"]] == ["cat", "person"]
    assert s["gt_label"] == VOC_CLASSES.index("cat")  # the largest box after the crop
    assert s["gt_multi_hot"].nonzero().flatten().tolist() == sorted([7, 14])
    mask = s["gt_mask"]
    assert (mask[1:15, 15:30] == VOC_CLASSES.index("cat") + 1).all() and (mask[0] == 255).all()
    assert (ds[2]["gt_mask"] == 255).all()  # no SegmentationClass PNG: everything ignored
    hard = build_dataset(cfg(dataset="voc", root=root, split="trainval", size=30, keep_difficult=False), train=False)
    assert hard[1]["gt_box_labels"].tolist() == [VOC_CLASSES.index("cat")]
    with pytest.raises(ConfigError, match=r"data\.split: list file .*test\.txt does not exist"):
        build_dataset(cfg(dataset="voc", root=root, split="test"))


def test_voc_bad_annotation_is_a_bad_file(tmp_path):
    root = tmp_path / "VOC2007"
    fixtures.make_voc(root)
    (root / "Annotations" / "000002.xml").write_text("<annotation><object>")
    (root / "SegmentationClass" / "000001.png").write_bytes(b"")
    ds = build_dataset(cfg(dataset="voc", root=root, split="trainval"), train=False)
    assert "cannot read annotation XML" in ds.check(1).reason and ds.check(1).source.endswith("000002.xml")
    assert ds.check(0).source.endswith("000001.png")


# ---- COCO-20K and COCO-Stuff-27 ---------------------------------------------------------------
def test_coco20k_boxes_without_crowd_and_multi_hot(tmp_path):
    ann, list_file = fixtures.make_coco20k(tmp_path)
    ds = build_dataset(cfg(dataset="coco20k", root=tmp_path, list_file=list_file, size=30), train=False)
    assert ds.ids == ["000000000009", "000000000025"] and ds.class_names == ["person", "car", "dog"]
    s = ds[0]  # crop x 5..35: dog [5,5,15,25] -> [0,5,10,25]; person [20,0,35,10] -> [15,0,30,10]
    assert s["gt_boxes"].tolist() == [[0.0, 5.0, 10.0, 25.0], [15.0, 0.0, 30.0, 10.0]]
    assert s["gt_box_labels"].tolist() == [2, 0] and s["gt_label"] == 2
    assert s["gt_multi_hot"].tolist() == [1.0, 0.0, 1.0]
    list_file.write_text("COCO_train2014_000000000077.jpg\n")
    with pytest.raises(ConfigError, match=r"data\.list_file: 1 ids of .* are not in"):
        build_dataset(cfg(dataset="coco20k", root=tmp_path, list_file=list_file))
    ann.write_text("{}")
    with pytest.raises(ConfigError, match=r"data\.annotation_file: .* is not a COCO instances JSON"):
        build_dataset(cfg(dataset="coco20k", root=tmp_path, list_file=list_file))


def test_coco_stuff27_coarse_mapping():
    lut = fine_to_coarse_lut()
    assert len(STUFF27_CLASSES) == 27
    assert sorted(set(lut[:182].tolist())) == list(range(27))  # every fine id maps, all 27 used
    assert (lut[182:] == 255).all()
    assert lut[0] == STUFF27_CLASSES.index("person") and lut[156] == STUFF27_CLASSES.index("sky")
    assert max(lut[:91]) < 12 and min(lut[91:182]) >= 12  # things first, then stuff


def test_coco_stuff27_masks(tmp_path):
    ids = fixtures.make_coco_stuff(tmp_path)
    ds = build_dataset(cfg(dataset="coco_stuff27", root=tmp_path, size=30), train=False)
    assert ds.ids == ids and ds.mask_class_names == list(STUFF27_CLASSES)
    s = ds[1]
    sky, person, wall = (STUFF27_CLASSES.index(n) for n in ("sky", "person", "wall"))
    assert set(torch.unique(s["gt_mask"]).tolist()) == {sky, person, wall, 255}
    assert s["gt_label"] == sky and s["gt_multi_hot"].nonzero().flatten().tolist() == sorted([person, wall, sky])
    (tmp_path / "annotations/train2017" / f"{ids[0]}.png").unlink()
    assert ds.check(0).reason == "stuffthingmap PNG does not exist"


def test_mask_of_the_wrong_size_is_a_bad_file(tmp_path):
    ids = fixtures.make_coco_stuff(tmp_path)
    fixtures.Image.fromarray(np.zeros((10, 10), np.uint8), "L").save(tmp_path / "annotations/train2017" / f"{ids[0]}.png")
    ds = build_dataset(cfg(dataset="coco_stuff27", root=tmp_path, on_bad_image="raise"), train=False)
    with pytest.raises(BadImageError, match="index 0: .*mask is 10x10 but the image is 40x30"):
        ds[0]


def test_lsun_lmdb_survives_pickling_in_the_same_process(tmp_path):
    import pickle

    fixtures.make_lsun_lmdb(tmp_path / "db", num_good=2, bad=False)
    ds = build_dataset(cfg(dataset="lsun_lmdb", root=tmp_path / "db"), train=False)
    first = ds[0]["image"]
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[0]["image"], first)


def test_coco_stuff27_refuses_values_that_are_no_stuffthingmap_id(tmp_path):
    # COCO-Stuff's stuff_*_pixelmaps are 1-based (0 unlabelled, 92..182 stuff, 183 "other"): read as
    # stuffthingmaps every class would be one off and "unlabelled" would become person
    ids = fixtures.make_coco_stuff(tmp_path)
    pixelmap = np.full((30, 40), 157, np.uint8)
    pixelmap[15:] = 183
    pixelmap[:, :5] = 0
    fixtures.Image.fromarray(pixelmap, "L").save(tmp_path / "annotations/train2017" / f"{ids[0]}.png")
    ds = build_dataset(cfg(dataset="coco_stuff27", root=tmp_path), train=False)
    bad = ds.check(0)
    assert bad is not None and bad.source.endswith(f"{ids[0]}.png") and "value 183 is no stuffthingmap id" in bad.reason
    assert ds.check(1) is None and ds[1] is not None  # 0..181 and 255 are fine


def test_coco_stuff27_root_of_another_layout_is_a_config_error(tmp_path):
    # the official download: images/train2017 and stuffthingmaps_trainval2017/train2017, no annotations/ folder
    ids = fixtures.make_coco_stuff(tmp_path)
    list_file = tmp_path / "ids.txt"
    list_file.write_text("\n".join(ids) + "\n")
    (tmp_path / "annotations").rename(tmp_path / "stuffthingmaps_trainval2017")
    with pytest.raises(ConfigError, match=r"^data\.root: COCO-Stuff label folder .*annotations/train2017.* does not exist"):
        build_dataset(cfg(dataset="coco_stuff27", root=tmp_path, list_file=list_file))
    with pytest.raises(ConfigError, match=r"^data\.root: COCO-Stuff image folder .*images/train2017.* does not exist"):
        build_dataset(cfg(dataset="coco_stuff27", root=tmp_path / "stuffthingmaps_trainval2017", list_file=list_file))
    (tmp_path / "stuffthingmaps_trainval2017").rename(tmp_path / "annotations")
    (tmp_path / "curated/train2017/Coco164kFull_Stuff_Coarse_7.txt").unlink()
    with pytest.raises(ConfigError, match=r"^data\.list_file: STEGO's curated list .* does not exist; .*data\.list_file"):
        build_dataset(cfg(dataset="coco_stuff27", root=tmp_path))
    assert build_dataset(cfg(dataset="coco_stuff27", root=tmp_path, list_file=list_file)).ids == ids


def test_voc_root_that_is_not_a_year_folder_names_data_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    fixtures.make_voc(root)
    with pytest.raises(ConfigError, match=r"^data\.root: .*VOCdevkit is not a VOC year folder: it has no "
                                          r"ImageSets/Main/ folder; point root at .*VOCdevkit/VOC2012$"):
        build_dataset(cfg(dataset="voc", root=tmp_path / "VOCdevkit"))
    shutil.rmtree(root / "Annotations")
    with pytest.raises(ConfigError, match=r"^data\.root: .*VOC2012 is not a VOC year folder: it has no Annotations/"):
        build_dataset(cfg(dataset="voc", root=root))


def test_imagenet100_flat_val_and_empty_class_folders_are_reported(tmp_path, caplog):
    wnids = imagenet100_wnids(None, "data")
    fixtures.make_imagenet(tmp_path, [wnids[0]])
    (tmp_path / "train" / wnids[1]).mkdir()  # extracted class tar that was empty / interrupted
    with caplog.at_level(logging.WARNING, logger="sgdm.data.folders"):
        ds = build_dataset(cfg(dataset="imagenet100", root=tmp_path, split="train"), train=False)
    assert {ds[i]["gt_label"] for i in range(len(ds))} == {0}
    assert any("1 class folder(s)" in r.getMessage() and "hold no images" in r.getMessage()
               and wnids[1] in r.getMessage() for r in caplog.records)
    shutil.rmtree(tmp_path / "val")  # the official layout: val/ILSVRC2012_val_00000001.JPEG, no class folders
    (tmp_path / "val").mkdir()
    for i in (1, 2):
        fixtures.Image.fromarray(fixtures.sample_rgb()).save(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    with pytest.raises(ConfigError, match=r"^data\.root: .*val has none of the 100 class folders .* It holds 2 images "
                                          r"directly: ImageNet's official flat val layout"):
        build_dataset(cfg(dataset="imagenet100", root=tmp_path, split="val"))


def test_imagenet100_class_list_takes_the_wnid_of_each_line(tmp_path):
    wnids = imagenet100_wnids(None, "data")
    fixtures.make_imagenet(tmp_path, [wnids[0], wnids[1]])
    mapping = tmp_path / "LOC_synset_mapping.txt"  # "<wnid> <names>", as ImageNet's Kaggle release has it
    mapping.write_text(f"{wnids[1]} tiger cat, Felis\n{wnids[0]}\tcastle\n")
    ds = build_dataset(cfg(dataset="imagenet100", root=tmp_path, class_list=mapping), train=False)
    assert ds.class_names == [wnids[1], wnids[0]] and ds[0]["id"].startswith(wnids[1]) and ds[0]["gt_label"] == 0
    mapping.write_text(f"wnid,name\n{wnids[0]},castle\n")
    with pytest.raises(ConfigError, match=r"^data\.class_list: .*'wnid,name' does not start with a WordNet id"):
        build_dataset(cfg(dataset="imagenet100", root=tmp_path, class_list=mapping))


def test_imagenet100_root_at_the_split_folder_says_to_use_its_parent(tmp_path):
    wnids = imagenet100_wnids(None, "data")
    fixtures.make_imagenet(tmp_path, [wnids[0]])
    with pytest.raises(ConfigError, match=r"^data\.root: ImageNet train folder .*train/train does not exist .*"
                                          r"holds class folders itself: point root at its parent$"):
        build_dataset(cfg(dataset="imagenet100", root=tmp_path / "train"))
    with pytest.raises(ConfigError, match=r"^data\.root: ImageNet root .*nowhere does not exist"):
        build_dataset(cfg(dataset="imagenet100", root=tmp_path / "nowhere"))


@pytest.mark.parametrize("above", ["", "ILSVRC"])
def test_imagenet100_root_above_kaggles_layout_names_the_folder_to_use(tmp_path, above):
    # Kaggle's download unpacks to ILSVRC/Data/CLS-LOC/{train,val,test}: root at its top said only that
    # root/train does not exist
    wnids = imagenet100_wnids(None, "data")
    fixtures.make_imagenet(tmp_path / "ILSVRC" / "Data" / "CLS-LOC", [wnids[0]])
    with pytest.raises(ConfigError, match=r"^data\.root: ImageNet train folder .* does not exist .*; point root at "
                                          r".*/ILSVRC/Data/CLS-LOC$"):
        build_dataset(cfg(dataset="imagenet100", root=tmp_path / above))


def test_coco_stuff27_root_above_its_folders_names_the_folder_to_use(tmp_path):
    # the cocostuff repository's download script unpacks into cocostuff/dataset/{images,annotations}
    fixtures.make_coco_stuff(tmp_path / "cocostuff" / "dataset")
    with pytest.raises(ConfigError, match=r"^data\.root: COCO-Stuff image folder .* does not exist; point root at "
                                          r".*/cocostuff/dataset$"):
        build_dataset(cfg(dataset="coco_stuff27", root=tmp_path / "cocostuff"))
