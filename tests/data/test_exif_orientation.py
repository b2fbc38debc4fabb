"""``data.exif_orientation``: decoding by the EXIF Orientation tag, per dataset kind, and validate-data's note."""
import io
import logging
import warnings

import numpy as np
import pytest
from PIL import Image

from sgdm.cli.main import main
from sgdm.config import ConfigError, from_dict
from sgdm.data import DataConfig, build_dataset
from sgdm.data.decode import read_image
from tests.data import fixtures

RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)  # sample_rgb's quadrants

# The EXIF 2.3 meaning of each Orientation value, as numpy slicing of the stored grid a [H, W, 3]
# into the upright image (written from the standard, not from PIL's table).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # turned 180 degrees
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # stored turned 90 degrees anticlockwise: turn clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # mirrored along the anti-diagonal
    8: lambda a: a.transpose(1, 0, 2)[::-1, :],  # stored turned 90 degrees clockwise: turn anticlockwise
}
# the same, said by the colours that land in the upright image's top-left and top-right corners
CORNERS = {1: (RED, GREEN), 2: (GREEN, RED), 3: (YELLOW, BLUE), 4: (BLUE, YELLOW),
           5: (RED, BLUE), 6: (BLUE, RED), 7: (YELLOW, GREEN), 8: (GREEN, YELLOW)}


def tagged_jpeg(orientation=None, exif_bytes=None, seed=0) -> bytes:
    """A 40x30 JPEG of ``sample_rgb`` with an EXIF Orientation tag (or the raw EXIF block ``exif_bytes``)."""
    buf = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    elif exif_bytes is not None:
        kwargs["exif"] = exif_bytes
    Image.fromarray(fixtures.sample_rgb(40, 30, seed=seed)).save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _pixels(path, mode):
    decoded = read_image(path, exif_orientation=mode)
    return np.asarray(decoded.image), decoded.orientation


def _corner(array, right: bool):
    """Mean colour of a 4x4 patch inside the top-left or top-right corner (JPEG rings at the edges)."""
    patch = array[2:6, -6:-2] if right else array[2:6, 2:6]
    return patch.reshape(-1, 3).mean(0)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_apply_turns_the_stored_grid_as_the_tag_says(tmp_path, orientation):
    path = write(tmp_path / "photo.jpg", tagged_jpeg(orientation))
    stored, tag = _pixels(path, "ignore")
    upright, tag_again = _pixels(path, "apply")
    assert tag == tag_again == orientation
    assert stored.shape == (30, 40, 3)  # ignore: the grid as stored
    assert upright.shape == ((40, 30, 3) if orientation >= 5 else (30, 40, 3))
    assert np.array_equal(upright, UPRIGHT[orientation](stored))
    left, right = CORNERS[orientation]
    assert np.abs(_corner(upright, False) - left).max() < 12 and np.abs(_corner(upright, True) - right).max() < 12


@pytest.mark.parametrize("orientation", [None, 1, 0, 9])
def test_no_tag_upright_or_out_of_range_tags_leave_the_image_as_stored(tmp_path, orientation):
    path = write(tmp_path / "photo.jpg", tagged_jpeg(orientation))
    stored, tag = _pixels(path, "ignore")
    applied, _ = _pixels(path, "apply")
    assert tag == 1 and stored.shape == (30, 40, 3) and np.array_equal(applied, stored)


def test_a_png_with_an_exif_chunk_is_turned_too(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "photo.png"
    Image.fromarray(fixtures.sample_rgb(40, 30)).save(path, exif=exif)
    upright, tag = _pixels(path, "apply")
    assert tag == 8 and np.array_equal(upright, UPRIGHT[8](fixtures.sample_rgb(40, 30)))


# an EXIF block whose IFD claims 5 entries and stops inside the first: Pillow warns "Corrupt EXIF data"
DAMAGED_EXIF = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12"


def test_a_damaged_exif_block_reads_the_image_as_stored_with_a_warning_under_apply(tmp_path, caplog, recwarn):
    path = write(tmp_path / "damaged.jpg", tagged_jpeg(exif_bytes=DAMAGED_EXIF))
    with caplog.at_level(logging.WARNING, logger="sgdm.data.decode"):
        stored, tag = _pixels(path, "ignore")
        assert tag == 1 and not caplog.records  # ignore: as before, not a word
        applied, tag = _pixels(path, "apply")
    assert tag == 1 and np.array_equal(applied, stored)
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"{path}: damaged EXIF block (Corrupt EXIF data") and message.endswith("read as stored")
    assert not [w for w in recwarn if "EXIF" in str(w.message)]  # Pillow's anonymous warning is not passed on


def test_pillows_other_warnings_are_still_shown(tmp_path, monkeypatch):
    """decode() records Pillow's warnings to find EXIF damage; the rest are warned again, as before."""
    from PIL import ImageFile

    load = ImageFile.ImageFile.load

    def noisy(self):
        warnings.warn("a Pillow warning", UserWarning)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", noisy)
    with pytest.warns(UserWarning, match="a Pillow warning"):
        read_image(write(tmp_path / "a.jpg", tagged_jpeg(6)), exif_orientation="apply")


def test_an_exif_parser_that_raises_does_not_make_a_bad_file(tmp_path, caplog, monkeypatch):
    path = write(tmp_path / "photo.jpg", tagged_jpeg(6))

    def broken(self):
        raise ValueError("bad IFD")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    data = from_dict(DataConfig, {"dataset": "image_folder", "root": str(tmp_path), "size": 8,
                                  "on_bad_image": "raise", "exif_orientation": "apply"}, "data")
    dataset = build_dataset(data, train=False)
    with caplog.at_level(logging.WARNING, logger="sgdm.data.decode"):
        assert dataset.inspect(0) == (None, 1) and dataset[0] is not None
    assert "damaged EXIF block (ValueError: bad IFD); read as stored" in caplog.text
    assert dataset.load(0).image.size == (40, 30)


def _layout(kind, root, data: bytes) -> dict:
    """A one-image dataset of ``kind`` holding ``data``; its data: section."""
    if kind == "image_folder":
        write(root / "a" / "photo.jpg", data)
        return {"root": str(root)}
    if kind == "lsun_list":
        write(root / "images" / "photo.jpg", data)
        (root / "list.txt").write_text("photo.jpg\n")
        return {"root": str(root / "images"), "list_file": str(root / "list.txt")}
    if kind == "imagenet100":
        write(root / "train" / "n01558993" / "photo.JPEG", data)  # first class of the shipped list
        return {"root": str(root)}
    import lmdb

    env = lmdb.open(str(root / "church_lmdb"), map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"0" * 40, data)
    env.close()
    return {"root": str(root / "church_lmdb")}


@pytest.mark.parametrize("kind", ["image_folder", "lsun_list", "imagenet100", "lsun_lmdb"])
def test_every_file_kind_honours_the_setting(tmp_path, kind):
    section = {"dataset": kind, "size": 8, "num_workers": 0, "on_bad_image": "raise",
               **_layout(kind, tmp_path, tagged_jpeg(6))}
    ignore = build_dataset(from_dict(DataConfig, section, "data"), train=False)
    apply = build_dataset(from_dict(DataConfig, {**section, "exif_orientation": "apply"}, "data"), train=False)
    assert ignore.inspect(0) == apply.inspect(0) == (None, 6)
    assert ignore.load(0).image.size == (40, 30) and apply.load(0).image.size == (30, 40)
    # the stored grid's left (red/blue) becomes the top of the upright image: the crop sees other pixels
    assert not np.array_equal(ignore[0]["image"].numpy(), apply[0]["image"].numpy())


@pytest.mark.parametrize("kind, extra, why", [
    ("voc", {}, "ground-truth boxes and masks refer to the stored pixel grid"),
    ("coco20k", {"list_file": "/x/list.txt"}, "ground-truth boxes refer to the stored pixel grid"),
    ("coco_stuff27", {}, "ground-truth masks refer to the stored pixel grid"),
    ("shapes", {}, "drawn, not read from files"),
])
def test_apply_is_refused_where_annotations_lie_on_the_stored_grid_or_there_are_no_files(kind, extra, why):
    section = {"dataset": kind, "root": "/x", **extra}
    from_dict(DataConfig, section, "data")  # ignore: fine
    with pytest.raises(ConfigError) as info:
        from_dict(DataConfig, {**section, "exif_orientation": "apply"}, "data")
    assert info.value.key == "data.exif_orientation" and why in info.value.message


def test_an_unknown_value_and_a_dataset_built_around_the_config_are_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        from_dict(DataConfig, {"exif_orientation": "rotate"}, "data")
    assert info.value.key == "data.exif_orientation" and "expected one of 'ignore', 'apply'" in info.value.message
    from sgdm.data.shapes import ShapesDataset

    with pytest.raises(ValueError, match="would turn the image away from its boxes and masks"):
        ShapesDataset(4, 16, cache_dir=tmp_path, size=16, flip=False, exif_orientation="apply")


def _validate(tmp_path, capsys, **data):
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "image_folder", "root": str(tmp_path / "photos"),
                                               "num_workers": 0, **data}}))
    code = main(["validate-data", str(config)])
    return code, capsys.readouterr().out.splitlines()


def test_validate_data_notes_the_rotations_ignore_does_not_apply(tmp_path, capsys):
    photos = tmp_path / "photos"
    write(photos / "a_plain.jpg", tagged_jpeg())
    write(photos / "b_turned.jpg", tagged_jpeg(6))
    write(photos / "c_upright.jpg", tagged_jpeg(1))
    write(photos / "d_damaged.jpg", tagged_jpeg(exif_bytes=DAMAGED_EXIF))
    write(photos / "e_mirrored.jpg", tagged_jpeg(2))
    code, out = _validate(tmp_path, capsys)
    assert code == 0 and out[-2] == "image_folder (train): 5 of 5 items are fine, 0 cannot be read"
    assert out[-1] == ("note: 2 images carry an EXIF rotation or mirroring that data.exif_orientation=ignore does "
                       f"not apply; data.exif_orientation=apply reads them upright (first: {photos / 'b_turned.jpg'})")
    write(photos / "f_bad.jpg", b"not an image")  # the note does not change the exit status
    code, out = _validate(tmp_path, capsys)
    assert code == 1 and out[-1].startswith("note: 2 images") and any(line.startswith("BAD ") for line in out)
    code, out = _validate(tmp_path, capsys, exif_orientation="apply")  # applied: nothing to note
    assert code == 1 and not any(line.startswith("note:") for line in out)


def test_validate_data_has_no_note_without_rotated_images(tmp_path, capsys):
    write(tmp_path / "photos" / "a.jpg", tagged_jpeg(1))
    code, out = _validate(tmp_path, capsys)
    assert code == 0 and out == ["image_folder (train): 1 of 1 items are fine, 0 cannot be read"]
