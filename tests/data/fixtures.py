"""Tiny on-disk fixtures in each real dataset format, and every kind of bad file.

Images are small (24-40 px) and drawn so tests can tell where their content
went: ``sample_rgb`` puts a distinct colour in each quadrant.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def sample_rgb(width: int = 40, height: int = 30, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: quadrant colours (red, green / blue, yellow) plus small noise."""
    rng = np.random.default_rng(seed)
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2, : width // 2] = (220, 30, 30)
    array[: height // 2, width // 2 :] = (30, 200, 30)
    array[height // 2 :, : width // 2] = (30, 30, 220)
    array[height // 2 :, width // 2 :] = (230, 220, 30)
    return np.clip(array.astype(int) + rng.integers(-3, 4, array.shape), 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# ---- files that decode, in unusual modes ------------------------------------------------------
def write_unusual(folder: Path) -> dict[str, Path]:
    """One file per readable-but-unusual kind; returns {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = sample_rgb()
    paths = {}
    paths["rgb_png"] = folder / "rgb.png"
    Image.fromarray(rgb).save(paths["rgb_png"])
    paths["upper_jpg"] = folder / "UPPER.JPG"
    Image.fromarray(rgb).save(paths["upper_jpg"], format="JPEG", quality=95)
    paths["cmyk"] = folder / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(paths["cmyk"], format="JPEG", quality=95)
    paths["gray16"] = folder / "gray16.png"
    gray = np.full((30, 40), 32896, dtype=np.uint16)  # 128 * 257
    gray[:, 20:] = 65535
    Image.fromarray(gray).save(paths["gray16"])
    paths["rgba"] = folder / "rgba.png"
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :20, 3] = 0  # left half fully transparent (hidden colour stays in RGB)
    Image.fromarray(rgba, "RGBA").save(paths["rgba"])
    paths["gray"] = folder / "gray.png"
    Image.fromarray(rgb).convert("L").save(paths["gray"])
    paths["palette"] = folder / "palette.png"
    Image.fromarray(rgb).quantize(colors=8).save(paths["palette"])
    paths["webp"] = folder / "image.webp"
    Image.fromarray(rgb).save(paths["webp"], format="WEBP", lossless=True)
    return paths


# ---- files that must be reported as bad -----------------------------------------------------
def write_bad(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = encode(sample_rgb(64, 64), "JPEG", quality=90)
    paths = {"truncated": folder / "truncated.jpg", "zero_byte": folder / "empty.png",
             "not_image": folder / "notes.jpg", "truncated_png": folder / "cut.PNG"}
    paths["truncated"].write_bytes(good[: len(good) // 2])
    paths["zero_byte"].write_bytes(b"")
    paths["not_image"].write_text("this is not an image\n")
    png = encode(sample_rgb(64, 64), "PNG")
    paths["truncated_png"].write_bytes(png[: len(png) // 2])
    return paths


# ---- dataset layouts ------------------------------------------------------------------------
def make_lsun_lmdb(path: Path, num_good: int = 4, bad: bool = True) -> list[str]:
    """LSUN's LMDB: hex-id keys, WebP and JPEG values; plus a truncated value when ``bad``."""
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 24)
    keys = []
    with env.begin(write=True) as txn:
        for i in range(num_good):
            fmt = "WEBP" if i % 2 == 0 else "JPEG"
            key = f"{i:040x}"
            txn.put(key.encode(), encode(sample_rgb(48, 32, seed=i), fmt, quality=90))
            keys.append(key)
        if bad:
            data = encode(sample_rgb(48, 32), "JPEG")
            txn.put(b"f" * 40, data[: len(data) // 3])
            keys.append("f" * 40)
    env.close()
    return keys


def make_list_layout(root: Path) -> Path:
    """LDM's LSUN layout: images under root/images, list file of relative paths (one missing)."""
    (root / "images" / "sub").mkdir(parents=True)
    names = ["sub/a.jpg", "sub/b.webp", "c.JPEG", "missing.jpg"]
    for i, name in enumerate(names[:3]):
        fmt = {"jpg": "JPEG", "webp": "WEBP", "JPEG": "JPEG"}[name.rsplit(".", 1)[1]]
        (root / "images" / name).write_bytes(encode(sample_rgb(36, 28, seed=i), fmt, quality=90))
    list_file = root / "church_outdoor_train.txt"
    list_file.write_text("\n".join(names) + "\n")
    return list_file


def make_imagenet(root: Path, wnids: list[str], other: str = "n99999999") -> None:
    """root/{train,val}/<wnid>/*.JPEG for the given wnids and one class outside the list."""
    for split in ("train", "val"):
        for j, wnid in enumerate(wnids + [other]):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for k in range(2):
                Image.fromarray(sample_rgb(32, 24, seed=j * 10 + k)).save(folder / f"{wnid}_{k}.JPEG", "JPEG")


VOC_XML = """<annotation><filename>{id}.jpg</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
VOC_OBJECT = ("<object><name>{name}</name><difficult>{difficult}</difficult>"
              "<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def make_voc(root: Path) -> dict:
    """VOC2007-like tree: 3 images (40x30), XML boxes, SegmentationClass PNG for the first two."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main", "SegmentationClass"):
        (root / sub).mkdir(parents=True)
    objects = {
        "000001": [("dog", 0, (3, 4, 12, 20))],  # VOC corners: 1-based, inclusive
        "000002": [("cat", 0, (21, 2, 40, 15)), ("person", 1, (1, 16, 8, 30))],
        "000003": [("car", 0, (11, 11, 30, 30))],
    }
    for image_id, objs in objects.items():
        Image.fromarray(sample_rgb(40, 30)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        xml = "".join(VOC_OBJECT.format(name=n, difficult=d, x1=b[0], y1=b[1], x2=b[2], y2=b[3]) for n, d, b in objs)
        (root / "Annotations" / f"{image_id}.xml").write_text(VOC_XML.format(id=image_id, w=40, h=30, objects=xml))
    for image_id in ("000001", "000002"):
        mask = np.zeros((30, 40), dtype=np.uint8)
        for name, _, (x1, y1, x2, y2) in objects[image_id]:
            mask[y1 - 1 : y2, x1 - 1 : x2] = VOC_INDEX[name] + 1
        mask[0, :] = 255
        png = Image.fromarray(mask, "P")
        png.putpalette([v for i in range(256) for v in (i, i, i)])
        png.save(root / "SegmentationClass" / f"{image_id}.png")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n000003\n")
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n")
    return objects


VOC_INDEX = {"cat": 7, "dog": 11, "person": 14, "car": 6}


def make_coco20k(root: Path) -> tuple[Path, Path]:
    """COCO 2014 layout with an instances JSON of 3 images (one crowd box); list names 2 of them."""
    (root / "train2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for n, image_id in enumerate((9, 25, 30)):
        name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(sample_rgb(40, 30, seed=n)).save(root / "train2014" / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": 40, "height": 30})
    annotations += [
        {"id": 1, "image_id": 9, "category_id": 18, "bbox": [5, 5, 10, 20], "iscrowd": 0},
        {"id": 2, "image_id": 9, "category_id": 1, "bbox": [20, 0, 15, 10], "iscrowd": 0},
        {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0, 0, 40, 30], "iscrowd": 1},
        {"id": 4, "image_id": 25, "category_id": 3, "bbox": [10, 10, 5, 5], "iscrowd": 0},
    ]
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    ann = root / "annotations" / "instances_train2014.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    list_file = root / "coco_20k_filenames.txt"
    list_file.write_text("train2014/COCO_train2014_000000000009.jpg\nCOCO_train2014_000000000025.jpg\n")
    return ann, list_file


def make_coco_stuff(root: Path) -> list[str]:
    """STEGO's COCO-Stuff layout for train2017: 2 images, fine stuffthingmaps, curated list."""
    for sub in ("images/train2017", "annotations/train2017", "curated/train2017"):
        (root / sub).mkdir(parents=True)
    ids = ["000000000139", "000000000285"]
    for n, image_id in enumerate(ids):
        Image.fromarray(sample_rgb(40, 30, seed=n)).save(root / "images/train2017" / f"{image_id}.jpg", quality=95)
        fine = np.full((30, 40), 156, dtype=np.uint8)  # sky-other -> coarse "sky" (23)
        fine[15:, :] = 0  # person -> coarse 9
        fine[15:, 30:] = 255  # unlabelled stays ignore
        if n == 1:
            fine[:5, 10:15] = 171  # wall-concrete -> coarse "wall" (18)
        Image.fromarray(fine, "L").save(root / "annotations/train2017" / f"{image_id}.png")
    (root / "curated/train2017/Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(ids) + "\n")
    return ids
