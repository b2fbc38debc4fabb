"""Reading one image file (or encoded bytes) into an 8-bit RGB PIL image.

Unreadable inputs (missing, zero-byte, not an image, truncated) raise
:class:`BadImageError` naming the source. Readable-but-unusual images are
converted, not rejected:

- 16-bit grayscale (``I;16*``, ``I``): scaled by 255/65535 (a plain
  ``convert("RGB")`` would clip everything above 255 to white);
- float (``F``): taken as [0, 1] when its maximum is <= 1, else as [0, 255];
- alpha (``RGBA``, ``LA``, ``PA``, palette or RGB/L with a transparency key):
  composited over white, so hidden colour under transparent pixels never shows;
- CMYK: through its embedded ICC profile when it has one, else PIL's formula
  (PIL already un-inverts Adobe CMYK JPEGs);
- palette, 1-bit, grayscale, YCbCr, LAB, HSV: ``convert("RGB")``.

EXIF orientation is deliberately ignored: VOC/COCO boxes and masks refer to
the stored pixel grid.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})


def printable(name: str) -> str:
    """``name`` as text any terminal or UTF-8 file accepts: the bytes of a file name that is not
    valid UTF-8 (which Python keeps as surrogate escapes, ``caf\\udce9.png``) shown as ``caf\\xe9.png``."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


class BadImageError(OSError):
    """An image cannot be read. ``source`` is the file path (or LMDB key), ``reason`` why."""

    def __init__(self, source: str, reason: str, index: int | None = None, dataset: str | None = None):
        self.source = str(source)
        self.reason = reason
        self.index = index
        where = f"{dataset} " if dataset else ""
        at = f"{where}index {index}: " if index is not None else (f"{dataset}: " if dataset else "")
        super().__init__(f"{at}{printable(self.source)}: {reason}")

    def at(self, index: int, dataset: str) -> "BadImageError":
        return BadImageError(self.source, self.reason, index, dataset)


def bad_image_message(err: BaseException) -> str | None:
    """The one-line message of a :class:`BadImageError`, also of one raised in a DataLoader worker,
    or None for any other error.

    torch re-raises a worker's exception by calling its class with the whole traceback text, which
    BadImageError (source, reason) does not accept, so it arrives as a RuntimeError whose last line
    is ``sgdm.data.decode.BadImageError: <message>``.
    """
    if isinstance(err, BadImageError):
        return str(err)
    text = str(err).rstrip()
    if isinstance(err, RuntimeError) and text.startswith(f"Caught {BadImageError.__name__} in DataLoader worker"):
        _, found, message = text.splitlines()[-1].partition(f"{BadImageError.__name__}: ")
        return message if found else None
    return None


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the extension (any case: ``.JPG`` too) is one we decode."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def open_image(source: str | os.PathLike, data: bytes | None = None) -> Image.Image:
    """Decode ``data`` (or the file ``source``) fully into an RGB image.

    ``source`` names the input in errors; with ``data=None`` it is the path.
    """
    if data is None:
        path = Path(source)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BadImageError(source, "file does not exist") from None
        except OSError as err:
            raise BadImageError(source, f"cannot stat file: {err.strerror or err}") from None
        if size == 0:
            raise BadImageError(source, "zero-byte file")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise BadImageError(source, f"cannot read file: {err.strerror or err}") from None
    if len(data) == 0:
        raise BadImageError(source, "zero-byte image data")
    return decode_bytes(data, source)


def decode_bytes(data: bytes, source: str | os.PathLike) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now: truncated data fails here, not later in a worker
    except UnidentifiedImageError:
        raise BadImageError(source, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(source, f"too large: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadImageError(source, f"cannot decode ({type(err).__name__}: {err})") from None
    if image.width < 1 or image.height < 1:
        raise BadImageError(source, f"empty image ({image.width}x{image.height})")
    try:
        return to_rgb(image)
    except (OSError, ValueError) as err:
        raise BadImageError(source, f"cannot convert mode {image.mode} to RGB ({err})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of an opened image (conversions in the module docstring)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image)), "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    values = array.astype(np.float64)
    if array.dtype.kind == "f":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0  # PIL's I / I;16 modes come from 16-bit files
    return np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    icc = image.info.get("icc_profile")
    if icc:
        from PIL import ImageCms

        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: the plain formula is better than rejecting the image
    return image.convert("RGB")
