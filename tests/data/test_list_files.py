"""List files (``data.list_file``, VOC splits, class lists): encodings, line ends and repeated entries."""
import pytest

from sgdm.config import ConfigError, from_dict
from sgdm.data import DataConfig, build_dataset
from sgdm.data.folders import read_list
from tests.data import fixtures


def cfg(**kwargs) -> DataConfig:
    kwargs = {k: str(v) if hasattr(v, "as_posix") else v for k, v in kwargs.items()}
    return from_dict(DataConfig, {"size": 16, "num_workers": 0, **kwargs}, "data")


def test_byte_order_mark_and_crlf_are_not_part_of_the_names(tmp_path):
    list_file = fixtures.make_list_layout(tmp_path)
    list_file.write_bytes(b"\xef\xbb\xbfsub/a.jpg\r\nc.JPEG\r\n")  # what Windows Notepad writes
    assert read_list(list_file, "data.list_file") == ["sub/a.jpg", "c.JPEG"]
    ds = build_dataset(cfg(dataset="lsun_list", root=tmp_path / "images", list_file=list_file), train=False)
    assert ds.ids == ["sub/a.jpg", "c.JPEG"] and ds.check(0) is None


def test_voc_split_with_byte_order_mark(tmp_path):
    fixtures.make_voc(tmp_path)
    (tmp_path / "ImageSets/Main/trainval.txt").write_bytes(b"\xef\xbb\xbf000001\r\n000002\r\n")
    ds = build_dataset(cfg(dataset="voc", root=tmp_path, split="trainval"), train=False)
    assert ds.ids == ["000001", "000002"] and ds.check(0) is None


def test_a_repeated_line_names_the_key_the_id_and_the_lines(tmp_path):
    list_file = fixtures.make_list_layout(tmp_path)
    list_file.write_text("sub/a.jpg\nc.JPEG\n# comment\n\nsub/a.jpg\n")
    for kind in ("image_folder", "lsun_list"):
        with pytest.raises(ConfigError, match=r"^data\.list_file: sub/a\.jpg is listed twice in .*\(lines 1 and 5\)"):
            build_dataset(cfg(dataset=kind, root=tmp_path / "images", list_file=list_file))


def test_a_repeated_voc_id_names_the_split(tmp_path):
    fixtures.make_voc(tmp_path)
    (tmp_path / "ImageSets/Main/trainval.txt").write_text("000001\n000002\n000001  1\n")
    with pytest.raises(ConfigError, match=r"^data\.split: .*trainval\.txt: '000001' and '000001  1' name the same"):
        build_dataset(cfg(dataset="voc", root=tmp_path, split="trainval"))


def test_two_spellings_of_one_coco_image_are_refused(tmp_path):
    _, list_file = fixtures.make_coco20k(tmp_path)
    list_file.write_text("train2014/COCO_train2014_000000000009.jpg\nCOCO_train2014_000000000009.jpg\n")
    with pytest.raises(ConfigError, match=r"^data\.list_file: .*name the same image 9"):
        build_dataset(cfg(dataset="coco20k", root=tmp_path, list_file=list_file))


def test_a_repeated_class_names_the_class_list(tmp_path):
    (tmp_path / "train").mkdir()
    classes = tmp_path / "classes.txt"
    classes.write_text("n01\nn02\nn01\n")
    with pytest.raises(ConfigError, match=r"^data\.class_list: n01 is listed twice"):
        build_dataset(cfg(dataset="imagenet100", root=tmp_path, class_list=classes, split="train"))
