"""Pascal VOC 2007 / 2012 (``root`` = ``VOCdevkit/VOC2007``).

Ids come from ``ImageSets/Main/{split}.txt``; image ``JPEGImages/{id}.jpg``;
boxes and classes from ``Annotations/{id}.xml`` (VOC's 1-based inclusive pixel
corners become 0-based pixel edges: ``x1 = xmin - 1, x2 = xmax``); the class
map from ``SegmentationClass/{id}.png`` where it exists (palette indices:
0 background, 1..20 the classes, 255 boundary/ignore), else all 255.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from sgdm.config.core import ConfigError
from sgdm.data.base import ImageDataset, RawSample, limit
from sgdm.data.decode import BadImageError, strict_loading
from sgdm.data.folders import read_list, require_dir, require_distinct

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def _require_layout(root: Path, key: str) -> None:
    """Refuse a root that is not one year's folder (``VOCdevkit/VOC2012``), naming the folder to use instead."""
    missing = [sub for sub in ("ImageSets/Main", "JPEGImages", "Annotations") if not (root / sub).is_dir()]
    if not missing:
        return
    years = sorted(p for p in root.glob("*/ImageSets/Main") if p.is_dir())
    hint = (f"; point root at {years[0].parent.parent}" if years else
            "; point root at one year's folder, e.g. VOCdevkit/VOC2012")
    raise ConfigError(key, f"{root} is not a VOC year folder: it has no {missing[0]}/ folder{hint}")


class VocDataset(ImageDataset):
    name = "voc"
    has_labels = True
    has_boxes = True
    has_masks = True

    def __init__(self, root: Path, split: str = "trainval", keep_difficult: bool = True,
                 max_images: Optional[int] = None, key: str = "data", **kwargs):
        self.root = require_dir(Path(root), f"{key}.root", "VOC directory (e.g. VOCdevkit/VOC2007)")
        _require_layout(self.root, f"{key}.root")
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        lines = read_list(split_file, f"{key}.split")
        if not lines:
            raise ConfigError(f"{key}.split", f"{split_file} lists no images")
        ids = [line.split()[0] for line in lines]
        require_distinct(ids, lines, split_file, f"{key}.split")
        self.keep_difficult = keep_difficult
        super().__init__(limit(ids, max_images), class_names=VOC_CLASSES,
                         mask_class_names=("background",) + VOC_CLASSES, **kwargs)

    def source(self, index: int) -> str:
        return str(self.root / "JPEGImages" / f"{self.ids[index]}.jpg")

    def item_files(self, index: int) -> tuple[str, ...]:
        image_id = self.ids[index]
        return (self.source(index), str(self.root / "Annotations" / f"{image_id}.xml"),
                str(self.root / "SegmentationClass" / f"{image_id}.png"))

    def load(self, index: int) -> RawSample:
        sample = self.read(self.source(index))  # the stored grid ("apply" is refused); its EXIF orientation noted
        sample.boxes, sample.box_labels = self._objects(self.ids[index])
        mask_path = self.root / "SegmentationClass" / f"{self.ids[index]}.png"
        mask = None
        if mask_path.is_file():
            try:
                with strict_loading(), Image.open(mask_path) as png:
                    if png.mode not in ("P", "L"):
                        raise BadImageError(mask_path, f"segmentation PNG has mode {png.mode}, expected P or L")
                    mask = np.array(png)
            except (BadImageError, MemoryError):
                raise
            except Exception as err:  # OSError, SyntaxError, ... whatever a damaged file makes Pillow raise
                raise BadImageError(mask_path, f"cannot read segmentation PNG ({err})") from None
        sample.mask = mask
        return sample

    def _objects(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.root / "Annotations" / f"{image_id}.xml"
        try:
            tree = ET.parse(path)
        except (OSError, ET.ParseError) as err:
            raise BadImageError(path, f"cannot read annotation XML ({err})") from None
        boxes, labels = [], []
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in VOC_CLASSES:
                raise BadImageError(path, f"unknown VOC class {name!r}")
            if not self.keep_difficult and (obj.findtext("difficult") or "0").strip() == "1":
                continue
            bb = obj.find("bndbox")
            try:
                x1, y1, x2, y2 = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                raise BadImageError(path, f"object {name!r} has no valid bndbox") from None
            boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
            labels.append(VOC_CLASSES.index(name))
        return np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(labels, dtype=np.int64)
