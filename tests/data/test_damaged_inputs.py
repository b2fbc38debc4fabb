"""The data layer: list-file paths, list encodings, damaged files that made Pillow or LMDB raise
something other than a bad file, Pillow's LOAD_TRUNCATED_IMAGES, folders that cannot be listed."""
import io
import logging
import os
import struct

import numpy as np
import pytest
from PIL import Image, ImageFile

from sgdm.config import ConfigError, from_dict
from sgdm.data import BadImageError, DataConfig, build_dataset
from sgdm.data.decode import decode, open_image
from sgdm.data.folders import read_list, scan_images
from tests.data import fixtures


def cfg(**kwargs) -> DataConfig:
    kwargs = {k: str(v) if hasattr(v, "as_posix") else v for k, v in kwargs.items()}
    return from_dict(DataConfig, {"size": 8, "num_workers": 0, "on_bad_image": "raise", **kwargs}, "data")


def save(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(fixtures.sample_rgb(16, 12, seed=seed)).save(path)


@pytest.fixture
def classes(tmp_path):
    root = tmp_path / "root"
    for i, name in enumerate(("cats/a.png", "dogs/b.png")):
        save(root / name, seed=i)
    save(tmp_path / "outside.png")
    return root


def listed(tmp_path, root, lines, **kwargs):
    list_file = tmp_path / "list.txt"
    list_file.write_text("\n".join(lines) + "\n")
    return build_dataset(cfg(dataset="image_folder", root=root, list_file=list_file, **kwargs), train=False)


# ---- data.list_file: one id per file, below root ------------------------------------------------
def test_list_lines_are_ids_spelt_as_a_scan_spells_them(tmp_path, classes):
    # `find . -name '*.png' > list.txt` writes ./ before every name: the class was '.', for every image
    ds = listed(tmp_path, classes, ["./cats/a.png", "dogs//b.png"], folder_labels=True)
    assert ds.ids == ["cats/a.png", "dogs/b.png"] and ds.class_names == ["cats", "dogs"] and ds.labels == [0, 1]
    assert ds.ids == scan_images(classes)
    ds = listed(tmp_path, classes, [str(classes / "dogs" / "b.png")], folder_labels=True)  # absolute, inside root
    assert ds.ids == ["dogs/b.png"] and ds.class_names == ["dogs"] and ds[0]["id"] == "dogs/b.png"


@pytest.mark.parametrize("line", ["./cats/a.png", "cats//a.png", "dogs/../cats/a.png"])
def test_two_spellings_of_one_listed_file_are_refused(tmp_path, classes, line):
    with pytest.raises(ConfigError, match=r"^data\.list_file: .*'cats/a\.png' and .* name the same image cats/a\.png"):
        listed(tmp_path, classes, ["cats/a.png", line])


@pytest.mark.parametrize("line", ["../outside.png", "{tmp}/outside.png", ".", "cats/../.."])
def test_a_line_that_leads_out_of_root_is_refused(tmp_path, classes, line):
    line = line.format(tmp=tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.list_file: .* is not a file below the dataset root"):
        listed(tmp_path, classes, ["cats/a.png", line])


def test_a_utf16_list_is_read_and_a_nul_is_refused_naming_the_line(tmp_path, classes):
    list_file = tmp_path / "list.txt"
    list_file.write_text("cats/a.png\r\ndogs/b.png\r\n", encoding="utf-16")  # Windows PowerShell's `>`
    assert read_list(list_file, "data.list_file") == ["cats/a.png", "dogs/b.png"]
    list_file.write_bytes("cats/a.png\n".encode("utf-16-le"))  # no byte-order mark: a NUL after each letter
    with pytest.raises(ConfigError, match=r"^data\.list_file: .*list\.txt line 1 holds a NUL character"):
        build_dataset(cfg(dataset="image_folder", root=classes, list_file=list_file), train=False)


def test_a_file_name_with_a_nul_is_a_bad_file_not_a_crash(tmp_path):
    with pytest.raises(BadImageError, match="not a file name"):
        open_image(str(tmp_path / "a\0.png"))


# ---- damaged files --------------------------------------------------------------------------------
def tiff_strip_offset_as_fraction() -> bytes:
    """A 1x1 grey TIFF whose StripOffsets is a RATIONAL: Pillow's load raised TypeError, not OSError."""
    entries = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 5, None), (277, 3, 1),
               (278, 3, 1), (279, 4, 1)]
    extra = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, value in entries:
        if kind == 5:
            out += struct.pack("<HHII", tag, kind, 1, extra)
        elif kind == 3:
            out += struct.pack("<HHIHH", tag, kind, 1, value, 0)
        else:
            out += struct.pack("<HHII", tag, kind, 1, value)
    return out + struct.pack("<I", 0) + struct.pack("<II", 3 * (extra + 8) + 1, 3) + b"\x80"


def test_a_damaged_header_that_makes_pillow_raise_another_error_is_a_bad_file(tmp_path):
    path = tmp_path / "images" / "odd.tif"
    path.parent.mkdir()
    path.write_bytes(tiff_strip_offset_as_fraction())
    with pytest.raises(BadImageError, match=r"cannot decode \(TypeError"):
        decode(path.read_bytes(), path)
    ds = build_dataset(cfg(dataset="image_folder", root=path.parent, on_bad_image="skip"), train=False)
    assert ds[0] is None and ds.skipped[0].source == str(path)  # skipped, the run goes on


def truncated_png() -> bytes:
    """The first half of an 8-bit class map (mode L, as masks are)."""
    png = fixtures.encode(np.random.default_rng(0).integers(0, 21, (64, 64), dtype=np.uint8), "PNG")
    return png[: len(png) // 2]


@pytest.fixture
def load_truncated_images():
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # what many training scripts set
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = before


def test_truncated_files_are_bad_even_with_pillows_load_truncated_images(tmp_path, load_truncated_images):
    bad = fixtures.write_bad(tmp_path)
    for kind in ("truncated", "truncated_png"):
        with pytest.raises(BadImageError, match="cannot decode"):
            open_image(bad[kind])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is left as it was
    assert open_image(fixtures.write_unusual(tmp_path / "good")["rgb_png"]).size == (40, 30)


def test_truncated_masks_are_bad_even_with_pillows_load_truncated_images(tmp_path, load_truncated_images):
    voc = tmp_path / "voc"
    fixtures.make_voc(voc)
    (voc / "SegmentationClass" / "000001.png").write_bytes(truncated_png())
    ds = build_dataset(cfg(dataset="voc", root=voc, split="trainval", on_bad_image="skip"), train=False)
    assert ds.check(0).source == str(voc / "SegmentationClass" / "000001.png") and ds.check(1) is None
    stuff = tmp_path / "stuff"
    ids = fixtures.make_coco_stuff(stuff)
    (stuff / "annotations/train2017" / f"{ids[0]}.png").write_bytes(truncated_png())
    ds = build_dataset(cfg(dataset="coco_stuff27", root=stuff, on_bad_image="skip"), train=False)
    assert "cannot read stuffthingmap PNG" in ds.check(0).reason and ds.check(1) is None


# ---- LSUN's LMDB: a truncated or damaged data.mdb -----------------------------------------------
def big_lmdb(path, count=64):
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(count):  # values over a page each: the file has many overflow pages
            txn.put(f"{i:040x}".encode(), fixtures.encode(fixtures.sample_rgb(64, 64, seed=i), "PNG"))
    env.close()


def test_a_truncated_data_mdb_is_a_config_error_not_a_bus_error(tmp_path):
    root = tmp_path / "church_outdoor_train_lmdb"
    big_lmdb(root)
    data = (root / "data.mdb").read_bytes()
    (root / "data.mdb").write_bytes(data[: len(data) // 2])  # reading a key past the end: SIGBUS
    with pytest.raises(ConfigError, match=r"^data\.root: .*data\.mdb is truncated: \d+ bytes, but its LMDB "):
        build_dataset(cfg(dataset="lsun_lmdb", root=root), train=False)


def test_a_damaged_lmdb_page_is_a_config_error_or_a_bad_file(tmp_path, monkeypatch):
    import lmdb

    root = tmp_path / "tower_lmdb"
    big_lmdb(root)
    data = bytearray((root / "data.mdb").read_bytes())
    data[2 * 4096 : 2 * 4096 + 64] = bytes(range(64))  # the first page after the two meta pages
    (root / "data.mdb").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"^data\.root: cannot list the keys of LMDB .*damaged"):
        build_dataset(cfg(dataset="lsun_lmdb", root=root), train=False)

    good = tmp_path / "bridge_lmdb"
    big_lmdb(good, count=2)
    ds = build_dataset(cfg(dataset="lsun_lmdb", root=good, on_bad_image="skip"), train=False)

    class Damaged:
        def __init__(self, env):
            self.env = env

        def begin(self, **kwargs):
            raise lmdb.CorruptedError("mdb_get: MDB_CORRUPTED: Located page was wrong type")

    import sgdm.data.lsun as lsun

    real = lsun._environment
    monkeypatch.setattr(lsun, "_environment", lambda root: Damaged(real(root)))
    assert ds[0] is None and "cannot read the LMDB value (CorruptedError" in ds.skipped[0].reason


# ---- folders that cannot be listed ---------------------------------------------------------------
def test_a_folder_that_cannot_be_listed_is_warned_about(tmp_path, monkeypatch, caplog):
    for name in ("a.png", "locked/b.png", "open/c.png"):
        save(tmp_path / name)
    real = os.scandir

    def scandir(path="."):  # root reads every folder, so chmod cannot lock one in a test
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="sgdm.data.folders"):
        assert scan_images(tmp_path) == ["a.png", "open/c.png"]
    [warning] = [r.getMessage() for r in caplog.records if "cannot be listed" in r.getMessage()]
    assert "1 folder(s)" in warning and str(tmp_path / "locked") in warning and "Permission denied" in warning


def test_the_skip_warning_names_a_file_that_is_not_utf8_readably(tmp_path, caplog):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / os.fsdecode(b"caf\xe9.png")).write_bytes(b"not an image")
    ds = build_dataset(cfg(dataset="image_folder", root=root, on_bad_image="skip"), train=False)
    with caplog.at_level(logging.WARNING, logger="sgdm.data.base"):
        assert ds[0] is None
    [message] = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    message.encode("utf-8")  # a log file in UTF-8 takes it
    assert "caf\\xe9.png" in message


def test_the_tiff_orientation_pillow_applies_on_open_reads_upright_under_both_settings():
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(buffer, "TIFF", exif=exif)
    for setting in ("ignore", "apply"):
        decoded = decode(buffer.getvalue(), "x.tif", setting)
        assert decoded.image.size == (4, 6) and decoded.orientation == 1, setting


def test_validate_data_notes_the_exif_rotations_of_voc_and_coco_images_too(tmp_path, capsys):
    import yaml

    from sgdm.cli.main import main

    exif = Image.Exif()
    exif[0x0112] = 6
    voc = tmp_path / "voc"
    fixtures.make_voc(voc)
    Image.fromarray(fixtures.sample_rgb(40, 30)).save(voc / "JPEGImages" / "000002.jpg", exif=exif)
    stuff = tmp_path / "stuff"
    ids = fixtures.make_coco_stuff(stuff)
    Image.fromarray(fixtures.sample_rgb(40, 30)).save(stuff / "images/train2017" / f"{ids[1]}.jpg", exif=exif)
    for data, photo in ((dict(dataset="voc", root=str(voc), split="trainval"), voc / "JPEGImages" / "000002.jpg"),
                        (dict(dataset="coco_stuff27", root=str(stuff)), stuff / "images/train2017" / f"{ids[1]}.jpg")):
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({"data": {**data, "num_workers": 0}}))
        assert main(["validate-data", str(config)]) == 0
        note = capsys.readouterr().out.splitlines()[-1]
        assert note.startswith("note: 1 images carry an EXIF rotation") and f"(first: {photo})" in note
        assert f"{data['dataset']} reads the stored pixels, which its annotations refer to" in note


@pytest.mark.parametrize("kind, key", [("imagenet100", "list_file"), ("lsun_lmdb", "list_file"), ("voc", "list_file"),
                                       ("shapes", "list_file"), ("image_folder", "class_list"),
                                       ("coco_stuff27", "annotation_file")])
def test_a_file_key_the_kind_does_not_read_is_refused_not_ignored(kind, key):
    with pytest.raises(ConfigError) as info:
        from_dict(DataConfig, {"dataset": kind, "root": "/x", key: "/x/subset.txt"}, "data")
    assert info.value.key == f"data.{key}" and f"dataset {kind!r} does not read it" in info.value.message
    from_dict(DataConfig, {"dataset": "coco20k", "root": "/x", "list_file": "/l", "annotation_file": "/a"}, "data")
    from_dict(DataConfig, {"dataset": "imagenet100", "root": "/x", "class_list": "/c"}, "data")
