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

EXIF orientation (``data.exif_orientation``): every decode reads the file's
Orientation tag (values 2..8 turn or mirror the stored grid; 1, none, any other
value or an unreadable EXIF block count as 1) and reports it as
:attr:`Decoded.orientation`. Under ``"ignore"`` (the default, as LDM's and
torchvision's loaders) the stored pixel grid is returned: VOC/COCO boxes and
masks refer to it. Under ``"apply"`` the image is turned upright with
``PIL.ImageOps.exif_transpose`` before the RGB conversion. EXIF is optional
metadata, so a damaged EXIF block never makes a decodable image a bad file:
without a readable tag the image is read as stored; under ``"apply"`` a logged
warning names the file, and Pillow's own anonymous "Corrupt EXIF data" warning
is not shown under either setting. TIFF is the exception: Pillow itself turns a TIFF upright by its
Orientation tag when it opens the file, and drops the tag, under either setting (so LDM's and
torchvision's loaders read it upright too); it is reported as orientation 1.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

ExifOrientation = Literal["ignore", "apply"]
EXIF_ORIENTATIONS: tuple[str, ...] = ("ignore", "apply")
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 upright, 2..8 the stored grid is mirrored and/or turned

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


@dataclass(frozen=True)
class Decoded:
    """A decoded image: ``image`` 8-bit RGB; ``orientation`` the file's EXIF Orientation tag as stored
    (2..8; 1 when upright, absent, out of range or unreadable), whether or not it was applied."""

    image: Image.Image
    orientation: int = 1


def read_image(source: str | os.PathLike, data: bytes | None = None,
               exif_orientation: ExifOrientation = "ignore") -> Decoded:
    """Decode ``data`` (or the file ``source``) fully into an RGB image, turned upright by its EXIF
    orientation when ``exif_orientation="apply"``.

    ``source`` names the input in errors; with ``data=None`` it is the path.
    """
    if data is None:
        data = _read_file(source)
    if len(data) == 0:
        raise BadImageError(source, "zero-byte image data")
    return decode(data, source, exif_orientation)


def open_image(source: str | os.PathLike, data: bytes | None = None,
               exif_orientation: ExifOrientation = "ignore") -> Image.Image:
    """:func:`read_image`'s RGB image only."""
    return read_image(source, data, exif_orientation).image


def decode_bytes(data: bytes, source: str | os.PathLike, exif_orientation: ExifOrientation = "ignore") -> Image.Image:
    """:func:`decode`'s RGB image only."""
    return decode(data, source, exif_orientation).image


def _read_file(source: str | os.PathLike) -> bytes:
    path = Path(source)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImageError(source, "file does not exist") from None
    except OSError as err:
        raise BadImageError(source, f"cannot stat file: {err.strerror or err}") from None
    except ValueError as err:  # a name no file can have: "embedded null byte"
        raise BadImageError(source, f"not a file name ({err})") from None
    if size == 0:
        raise BadImageError(source, "zero-byte file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise BadImageError(source, f"cannot read file: {err.strerror or err}") from None


def decode(data: bytes, source: str | os.PathLike, exif_orientation: ExifOrientation = "ignore") -> Decoded:
    """Decode encoded bytes; ``source`` names them in errors."""
    if exif_orientation not in EXIF_ORIENTATIONS:
        raise ValueError(f"exif_orientation must be 'ignore' or 'apply', got {exif_orientation!r}")
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught, strict_loading():
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # a JPEG's EXIF block is parsed here (for its DPI)
            image.load()  # decode now: truncated data fails here, not later in a worker
            orientation, damage = _orientation(image)
    except UnidentifiedImageError:
        raise BadImageError(source, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(source, f"too large: {err} (Pillow's guard, PIL.Image.MAX_IMAGE_PIXELS = "
                                    f"{Image.MAX_IMAGE_PIXELS}; a training image needs far fewer pixels: downscale "
                                    "such files first, e.g. to 4096 px on the long side, or raise the limit in a "
                                    "script that calls sgdm)") from None
    except MemoryError:
        raise
    except Exception as err:  # OSError, SyntaxError, EOFError, ... and what a plugin raises on a damaged
        # header (a TIFF whose strip offset is a fraction: TypeError): the file is bad, not the program
        raise BadImageError(source, f"cannot decode ({type(err).__name__}: {err})") from None
    finally:
        exif_warning = _replay_warnings(caught)  # shown before any error, as when they were not caught
    damage = damage or exif_warning
    if image.width < 1 or image.height < 1:
        raise BadImageError(source, f"empty image ({image.width}x{image.height})")
    if exif_orientation == "apply":
        image = _upright(image, orientation, damage, source)
    try:
        return Decoded(to_rgb(image), orientation)
    except (OSError, ValueError) as err:
        raise BadImageError(source, f"cannot convert mode {image.mode} to RGB ({err})") from None


_STRICT = threading.RLock()


@contextlib.contextmanager
def strict_loading():
    """Pillow's check for truncated data on while decoding, whatever ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
    says: the snippet ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` (common in training scripts, and in some
    libraries) would otherwise fill the missing part of a truncated file with grey without a word.
    The setting is restored afterwards. While it is on, sgdm's reads take turns (a lock); a thread of the
    caller's own that reads an image meanwhile sees it off."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _STRICT:
        saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _orientation(image: Image.Image) -> tuple[int, str | None]:
    """(the Orientation tag, 2..8, else 1; the parser's error, or None)."""
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception as err:  # any parser failure: the pixels decoded, and EXIF is optional metadata
        return 1, f"{type(err).__name__}: {err}"
    return (value if isinstance(value, int) and 2 <= value <= 8 else 1), None


def _replay_warnings(caught: list[warnings.WarningMessage]) -> str | None:
    """Warn again what Pillow warned while decoding, except its EXIF complaints ("Corrupt EXIF data"),
    which only matter to ``apply`` and are returned (the first) for it to report with the file name."""
    damage = None
    for w in caught:
        if "EXIF" in str(w.message):
            damage = damage or str(w.message).strip()
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # as often as before: the
            # catch_warnings around every decode already reset Python's once-per-location registries
    return damage


def _upright(image: Image.Image, orientation: int, damage: str | None, source) -> Image.Image:
    """``image`` turned as its EXIF orientation says; as stored (with a warning) when that fails."""
    if orientation == 1:
        if damage is not None:  # a tag read from a partly damaged block is applied without a word
            log.warning("%s: damaged EXIF block (%s); read as stored", printable(str(source)), damage)
        return image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the block was read (and any damage reported) in decode()
            return ImageOps.exif_transpose(image)
    except Exception as err:  # rewriting a damaged block: the stored grid is still an image
        log.warning("%s: cannot apply EXIF orientation %d (%s: %s); read as stored", printable(str(source)),
                    orientation, type(err).__name__, err)
        return image


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
