"""COCO-20K (boxes, LOST's benchmark subset) and COCO-Stuff-27 (masks, PiCIE/STEGO's curated split).

COCO-20K: ``root/train2014/<file>`` images, boxes and classes from the
instances JSON (crowd boxes excluded, as in LOST), restricted to the 19,817
files of ``list_file`` (lines are file names such as
``COCO_train2014_000000000009.jpg``, optionally with a folder, or bare ids).
COCO's bbox ``[x, y, w, h]`` becomes xyxy; categories are numbered 0..79 in
increasing COCO id.

COCO-Stuff-27: STEGO's layout, ``root/images/{split}2017/{id}.jpg``,
``root/annotations/{split}2017/{id}.png`` (COCO-Stuff 164k stuffthingmaps,
fine ids 0..181, 255 unlabelled; any other value makes the item a bad file:
it is not a stuffthingmap, e.g. COCO-Stuff's 1-based ``stuff_*_pixelmaps``) and the curated id list
``root/curated/{split}2017/Coco164kFull_Stuff_Coarse_7.txt`` (49,629 train,
2,175 val) unless ``list_file`` is given. Fine ids are merged into the 27
COCO-Stuff super-categories (12 things, then 15 stuff); ``gt_mask`` holds
coarse ids 0..26 directly (no background class), 255 = ignore.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from sgdm.config.core import ConfigError
from sgdm.data.base import ImageDataset, RawSample, limit
from sgdm.data.decode import BadImageError, strict_loading
from sgdm.data.folders import folder_below, read_list, require_dir, require_distinct, require_file

STUFF27_CLASSES = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window",
    "building", "ground", "plant", "sky", "solid", "structural", "water",
)
NUM_FINE = 182  # stuffthingmap ids 0..181 (91 thing + 91 stuff slots; 255 = unlabelled)
# fine stuffthingmap ids (0-based COCO-Stuff labels) of each coarse class, as inclusive ranges
_COARSE_MEMBERS: tuple[tuple[tuple[int, int], ...], ...] = (
    ((71, 76),), ((77, 82),), ((51, 60),), ((61, 70),), ((83, 90),), ((43, 50),), ((25, 32),), ((15, 24),),
    ((9, 14),), ((0, 0),), ((33, 42),), ((1, 8),),
    ((101, 102),),
    ((100, 100), (113, 117)),
    ((120, 121), (152, 152), (169, 169)),
    ((97, 97), (106, 107), (109, 109), (111, 111), (122, 122), (129, 129), (132, 132), (155, 155), (160, 160),
     (164, 164)),
    ((99, 99), (131, 131), (138, 138), (142, 142)),
    ((91, 92), (103, 104), (108, 108), (130, 130), (136, 136), (140, 140), (151, 151), (166, 167)),
    ((170, 176),),
    ((179, 180),),
    ((94, 95), (127, 127), (150, 150), (157, 157), (165, 165)),
    ((110, 110), (124, 125), (135, 135), (139, 139), (143, 144), (146, 146), (148, 148), (153, 153), (158, 158)),
    ((93, 93), (96, 96), (118, 118), (123, 123), (128, 128), (133, 133), (141, 141), (162, 162), (168, 168)),
    ((105, 105), (156, 156)),
    ((126, 126), (134, 134), (149, 149), (159, 159), (161, 161), (181, 181)),
    ((98, 98), (112, 112), (137, 137), (145, 145), (163, 163)),
    ((119, 119), (147, 147), (154, 154), (177, 178)),
)


def fine_to_coarse_lut() -> np.ndarray:
    """uint8 [256]: fine COCO-Stuff id -> coarse id 0..26; 255 and unused ids -> 255."""
    lut = np.full(256, 255, dtype=np.uint8)
    for coarse, ranges in enumerate(_COARSE_MEMBERS):
        for lo, hi in ranges:
            lut[lo : hi + 1] = coarse
    return lut


def _coco_id(line: str) -> int:
    match = re.search(r"(\d+)(?:\.\w+)?$", Path(line).name)
    if match is None:
        raise ValueError(line)
    return int(match.group(1))


class Coco20kDataset(ImageDataset):
    name = "coco20k"
    has_labels = True
    has_boxes = True

    def __init__(self, root: Path, list_file: Path, annotation_file: Optional[Path] = None,
                 max_images: Optional[int] = None, key: str = "data", **kwargs):
        self.image_dir = require_dir(Path(root) / "train2014", f"{key}.root", "COCO train2014 image folder")
        ann_path = Path(annotation_file) if annotation_file else Path(root) / "annotations" / "instances_train2014.json"
        require_file(ann_path, f"{key}.annotation_file", "COCO instances JSON")
        lines = read_list(list_file, f"{key}.list_file")
        try:
            wanted = [_coco_id(line) for line in lines]
        except ValueError as err:
            raise ConfigError(f"{key}.list_file", f"{list_file}: cannot find an image id in line {err}") from None
        require_distinct(wanted, lines, list_file, f"{key}.list_file")
        wanted = limit(wanted, max_images)
        try:
            coco = json.loads(ann_path.read_text())
            self._index(coco, set(wanted))
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{key}.annotation_file", f"{ann_path} is not a COCO instances JSON ({err})") from None
        missing = [i for i in wanted if i not in self.files]
        if missing:
            raise ConfigError(f"{key}.list_file", f"{len(missing)} ids of {list_file} are not in {ann_path} "
                              f"(first: {missing[0]})")
        if not wanted:
            raise ConfigError(f"{key}.list_file", f"list file {list_file} names no images")
        self.image_ids = wanted
        super().__init__([f"{i:012d}" for i in wanted], class_names=self.categories, **kwargs)

    def _index(self, coco: dict, wanted: set[int]) -> None:
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        self.categories = [c["name"] for c in cats]
        cat_index = {c["id"]: i for i, c in enumerate(cats)}
        self.files = {im["id"]: im["file_name"] for im in coco["images"] if im["id"] in wanted}
        self.objects: dict[int, list[tuple[list[float], int]]] = {i: [] for i in self.files}
        for ann in coco["annotations"]:
            if ann["image_id"] in self.objects and not ann.get("iscrowd", 0):
                x, y, w, h = ann["bbox"]
                self.objects[ann["image_id"]].append(([x, y, x + w, y + h], cat_index[ann["category_id"]]))

    def source(self, index: int) -> str:
        return str(self.image_dir / Path(self.files[self.image_ids[index]]).name)

    def item_files(self, index: int) -> tuple[str, ...]:
        return (self.source(index),)  # its boxes are in data.annotation_file, one file for all

    def load(self, index: int) -> RawSample:
        objects = self.objects[self.image_ids[index]]
        boxes = np.array([b for b, _ in objects], dtype=np.float64).reshape(-1, 4)
        labels = np.array([c for _, c in objects], dtype=np.int64)
        return self.read(self.source(index), boxes=boxes, box_labels=labels)  # stored grid, orientation noted


class CocoStuff27Dataset(ImageDataset):
    name = "coco_stuff27"
    has_labels = True
    has_masks = True
    mask_offset = 0

    def __init__(self, root: Path, split: str = "train", list_file: Optional[Path] = None,
                 max_images: Optional[int] = None, key: str = "data", **kwargs):
        self.root = require_dir(Path(root), f"{key}.root", "COCO-Stuff directory")
        folder = f"{split}2017"
        # checked here, not per item: a root of another layout would otherwise make every item a bad file
        what = f"COCO-Stuff image folder (root/images/{folder}, STEGO's layout)"
        below = None if (self.root / "images").is_dir() else folder_below(self.root, Path("images", folder))
        if below is not None:  # root one level too high (the cocostuff download's dataset/ folder)
            raise ConfigError(f"{key}.root", f"{what} {self.root / 'images' / folder} does not exist; point root "
                                             f"at {below}")
        self.image_dir = require_dir(self.root / "images" / folder, f"{key}.root", what)
        self.mask_dir = require_dir(self.root / "annotations" / folder, f"{key}.root",
                                    f"COCO-Stuff label folder (root/annotations/{folder}: the {folder} PNGs "
                                    "of stuffthingmaps_trainval2017.zip)")
        if list_file is None:
            list_file = self.root / "curated" / folder / "Coco164kFull_Stuff_Coarse_7.txt"
            if not list_file.is_file():
                raise ConfigError(f"{key}.list_file", f"STEGO's curated list {list_file} does not exist; copy it "
                                  "there or set data.list_file to a file of image ids")
        lines = read_list(Path(list_file), f"{key}.list_file")
        ids = [Path(line).stem for line in lines]
        require_distinct(ids, lines, list_file, f"{key}.list_file")
        if not ids:
            raise ConfigError(f"{key}.list_file", f"list file {list_file} names no images")
        self.lut = fine_to_coarse_lut()
        super().__init__(limit(ids, max_images), class_names=STUFF27_CLASSES, mask_class_names=STUFF27_CLASSES,
                         **kwargs)

    def source(self, index: int) -> str:
        return str(self.image_dir / f"{self.ids[index]}.jpg")

    def item_files(self, index: int) -> tuple[str, ...]:
        return self.source(index), str(self.mask_dir / f"{self.ids[index]}.png")

    def load(self, index: int) -> RawSample:
        sample = self.read(self.source(index))  # the stored grid ("apply" is refused); its EXIF orientation noted
        path = self.mask_dir / f"{self.ids[index]}.png"
        try:
            with strict_loading(), Image.open(path) as png:
                if png.mode not in ("L", "P"):
                    raise BadImageError(path, f"stuffthingmap has mode {png.mode}, expected L (8-bit ids)")
                fine = np.array(png)
        except FileNotFoundError:
            raise BadImageError(path, "stuffthingmap PNG does not exist") from None
        except (BadImageError, MemoryError):
            raise
        except Exception as err:  # OSError, SyntaxError, ... whatever a damaged file makes Pillow raise
            raise BadImageError(path, f"cannot read stuffthingmap PNG ({err})") from None
        invalid = (fine >= NUM_FINE) & (fine != 255)
        if invalid.any():  # e.g. a 1-based stuff_*_pixelmaps PNG (0 unlabelled, 183 other): every id one off
            raise BadImageError(path, f"value {int(fine[invalid].max())} is no stuffthingmap id (0..{NUM_FINE - 1} "
                                "and 255 = unlabelled); is this a 1-based COCO-Stuff pixelmap instead of "
                                "stuffthingmaps_trainval2017?")
        sample.mask = self.lut[fine]
        return sample
