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
