"""Decoding: unusual modes are converted correctly, unreadable files raise naming the file."""
import numpy as np
import pytest
import torch

from sgdm.data.decode import BadImageError, decode_bytes, is_image_file, open_image
from tests.data.fixtures import encode, sample_rgb, write_bad, write_unusual


@pytest.fixture(scope="module")
def unusual(tmp_path_factory):
    return write_unusual(tmp_path_factory.mktemp("unusual"))


def _rgb(path):
    image = open_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_every_unusual_mode_becomes_rgb_of_the_same_size(unusual):
    for kind, path in unusual.items():
        image = open_image(path)
        assert image.mode == "RGB", kind
        assert image.size == (40, 30), kind


def test_lossless_formats_keep_the_pixels(unusual):
    ref = sample_rgb().astype(int)
    assert np.array_equal(_rgb(unusual["rgb_png"]), ref)
    assert np.array_equal(_rgb(unusual["webp"]), ref)


def test_jpeg_and_cmyk_stay_close_to_the_source(unusual):
    ref = sample_rgb().astype(int)
    # compare away from the quadrant edges, where JPEG rings
    for kind in ("upper_jpg", "cmyk"):
        diff = np.abs(_rgb(unusual[kind]) - ref)[3:12, 3:16]
        assert diff.mean() < 8, kind


def test_16_bit_grayscale_is_scaled_not_clipped(unusual):
    out = _rgb(unusual["gray16"])
    assert np.all(out[:, :20] == 128)  # 32896 / 257
    assert np.all(out[:, 20:] == 255)
    assert np.all(out[..., 0] == out[..., 2])


def test_transparent_pixels_become_white_and_opaque_ones_keep_their_colour(unusual):
    out = _rgb(unusual["rgba"])
    assert np.all(out[:, :20] == 255)
    assert np.array_equal(out[:, 20:], sample_rgb().astype(int)[:, 20:])


def test_grayscale_and_palette(unusual):
    gray = _rgb(unusual["gray"])
    assert np.all(gray[..., 0] == gray[..., 1])
    palette = _rgb(unusual["palette"])
    assert np.abs(palette - sample_rgb().astype(int)).mean() < 6


def test_upper_case_extensions_are_images():
    assert is_image_file("a/B.JPG") and is_image_file("x.JPEG") and is_image_file("y.WebP")
    assert not is_image_file("notes.txt") and not is_image_file("README")


@pytest.mark.parametrize("kind,reason", [
    ("truncated", "cannot decode"),
    ("truncated_png", "cannot decode"),
    ("zero_byte", "zero-byte"),
    ("not_image", "not an image"),
])
def test_bad_files_raise_naming_the_file(tmp_path, kind, reason):
    path = write_bad(tmp_path)[kind]
    with pytest.raises(BadImageError) as info:
        open_image(path)
    assert info.value.source == str(path)
    assert reason in info.value.reason
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="does not exist"):
        open_image(tmp_path / "nope.jpg")


def test_bytes_are_named_by_their_source():
    data = encode(sample_rgb(), "JPEG")
    assert decode_bytes(data, "key").size == (40, 30)
    with pytest.raises(BadImageError, match=r"lmdb\[k1\]: cannot decode"):
        decode_bytes(data[:100], "lmdb[k1]")


def test_an_image_above_pillows_pixel_limit_is_bad_and_says_what_to_do(monkeypatch):
    from PIL import Image

    data = encode(sample_rgb(), "PNG")  # 40 x 30 = 1200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImageError, match=r"^big\.png: too large: .*1200 pixels.*PIL\.Image\.MAX_IMAGE_PIXELS = 1000;"
                                            r" .*downscale such files first"):
        decode_bytes(data, "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
    assert decode_bytes(data, "big.png").size == (40, 30)


def test_bad_image_error_with_index_names_dataset_file_and_index():
    err = BadImageError("/d/x.jpg", "zero-byte file").at(7, "voc")
    assert str(err) == "voc index 7: /d/x.jpg: zero-byte file"


def test_bad_image_message_also_unwraps_a_dataloader_worker_error():
    from torch.utils.data import DataLoader

    from sgdm.data.decode import bad_image_message

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise BadImageError("/d/x.png", "cannot decode (OSError: truncated)").at(index, "image_folder")

    expected = "image_folder index 0: /d/x.png: cannot decode (OSError: truncated)"
    with pytest.raises(RuntimeError) as info:  # torch cannot rebuild a BadImageError from the text
        next(iter(DataLoader(Bad(), num_workers=1, collate_fn=list)))
    assert bad_image_message(info.value) == expected
    direct = BadImageError("/d/x.png", "zero-byte file").at(0, "image_folder")
    assert bad_image_message(direct) == "image_folder index 0: /d/x.png: zero-byte file"
    assert bad_image_message(RuntimeError("CUDA out of memory")) is None and bad_image_message(ValueError("x")) is None
