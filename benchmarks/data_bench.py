"""Data-loading throughput: images/s decoded and preprocessed at 256x256, per format, for 0/1/2 workers.

Builds a synthetic copy of each dataset layout at its real image size
(LSUN ~256x341 WebP in an LMDB and JPEG in LDM's list layout, ImageNet
500x375 JPEG, VOC 500x375 JPEG + XML + PNG masks, COCO 640x480 JPEG + JSON /
stuffthingmap PNGs, shapes from its cache) and times full passes through a
DataLoader (batch 32, ``collate_samples``, flips on). Reports the median of
``--repeats`` passes after a warm-up pass (persistent workers: steady state,
not start-up) and the rate training needs: ``train_batch * gpu_steps_per_s``
(default: LDM's LSUN-Churches batch 96 at 2 steps/s, our
assumption for one A100/H100 running the 294M LDM-8 UNet on 32x32x4 latents
plus the encoder; with cached latents images are decoded only once).

    python benchmarks/data_bench.py [--num-images 192] [--workers 0 1 2] [--json out.json]
    python benchmarks/data_bench.py --num-images 8 --workers 0 --repeats 1 --batch-size 4   # quick
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgdm.config import from_dict  # noqa: E402
from sgdm.data import DataConfig, build_dataset, collate_samples  # noqa: E402
from sgdm.data.shapes import generate  # noqa: E402


def photo(seed: int, width: int, height: int, pool: np.ndarray) -> np.ndarray:
    """A photo-like uint8 image: a shapes image upscaled (smooth regions + edges) with sensor noise."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(pool[seed % len(pool)]).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(base).astype(np.int16) + rng.normal(0, 4, (height, width, 3)).astype(np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, quality=85)
    return buf.getvalue()


def make_lsun(root: Path, n: int, pool) -> dict[str, dict]:
    import lmdb

    env = lmdb.open(str(root / "church_outdoor_train_lmdb"), map_size=1 << 30)
    (root / "lsun_images").mkdir()
    names = []
    with env.begin(write=True) as txn:
        for i in range(n):
            array = photo(i, 341, 256, pool)
            txn.put(f"{i:040x}".encode(), encoded(array, "WEBP"))
            (root / "lsun_images" / f"{i:06d}.jpg").write_bytes(encoded(array, "JPEG"))
            names.append(f"{i:06d}.jpg")
    env.close()
    (root / "lsun_list.txt").write_text("\n".join(names))
    return {"image_folder": {"root": root / "lsun_images"},
            "lsun_lmdb": {"root": root / "church_outdoor_train_lmdb"},
            "lsun_list": {"root": root / "lsun_images", "list_file": root / "lsun_list.txt"}}


def make_imagenet(root: Path, n: int, pool) -> dict[str, dict]:
    wnids = ["n01749939", "n02488291"]
    for i in range(n):
        folder = root / "imagenet" / "train" / wnids[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.JPEG").write_bytes(encoded(photo(i, 500, 375, pool), "JPEG"))
    return {"imagenet100": {"root": root / "imagenet"}}


def make_voc(root: Path, n: int, pool) -> dict[str, dict]:
    voc = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main", "SegmentationClass"):
        (voc / sub).mkdir(parents=True)
    obj = ("<object><name>dog</name><difficult>0</difficult><bndbox><xmin>50</xmin><ymin>40</ymin>"
           "<xmax>300</xmax><ymax>330</ymax></bndbox></object>")
    for i in range(n):
        (voc / "JPEGImages" / f"{i:06d}.jpg").write_bytes(encoded(photo(i, 500, 375, pool), "JPEG"))
        (voc / "Annotations" / f"{i:06d}.xml").write_text(f"<annotation>{obj}</annotation>")
        mask = np.zeros((375, 500), np.uint8)
        mask[40:330, 50:300] = 12
        Image.fromarray(mask, "L").save(voc / "SegmentationClass" / f"{i:06d}.png")
    (voc / "ImageSets/Main/trainval.txt").write_text("\n".join(f"{i:06d}" for i in range(n)))
    return {"voc": {"root": voc, "split": "trainval"}}


def make_coco(root: Path, n: int, pool) -> dict[str, dict]:
    coco = root / "coco"
    for sub in ("train2014", "annotations", "images/train2017", "annotations/train2017", "curated/train2017"):
        (coco / sub).mkdir(parents=True, exist_ok=True)
    images, anns, names = [], [], []
    for i in range(n):
        array = photo(i, 640, 480, pool)
        name = f"COCO_train2014_{i + 1:012d}.jpg"
        (coco / "train2014" / name).write_bytes(encoded(array, "JPEG"))
        (coco / "images/train2017" / f"{i + 1:012d}.jpg").write_bytes(encoded(array, "JPEG"))
        fine = np.full((480, 640), 156, np.uint8)
        fine[240:] = 0
        Image.fromarray(fine, "L").save(coco / "annotations/train2017" / f"{i + 1:012d}.png")
        images.append({"id": i + 1, "file_name": name, "width": 640, "height": 480})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [100, 50, 200, 300], "iscrowd": 0})
        names.append(name)
    (coco / "annotations/instances_train2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}))
    (coco / "coco_20k.txt").write_text("\n".join(names))
    (coco / "curated/train2017/Coco164kFull_Stuff_Coarse_7.txt").write_text(
        "\n".join(f"{i + 1:012d}" for i in range(n)))
    return {"coco20k": {"root": coco, "list_file": coco / "coco_20k.txt"}, "coco_stuff27": {"root": coco}}


def throughput(dataset, workers: int, batch_size: int, repeats: int) -> float:
    """Median images/s over ``repeats`` passes after one warm-up pass (workers stay up: steady state)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_samples,
                        persistent_workers=workers > 0)
    rates = []
    for epoch in range(repeats + 1):
        start = time.perf_counter()
        count = sum(len(batch["id"]) for batch in loader)
        if epoch > 0:
            rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=192)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=96, help="training batch (LDM LSUN-Churches: 96)")
    parser.add_argument("--gpu-steps-per-s", type=float, default=2.0, help="assumed GPU training step rate")
    parser.add_argument("--json", metavar="PATH", help="also write the rates here")
    args = parser.parse_args(argv)
    for name, low in (("num_images", 1), ("repeats", 1), ("batch_size", 1), ("size", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')}: expected at least {low}, got {getattr(args, name)}")
    if min(args.workers) < 0:
        parser.error(f"--workers: expected worker counts >= 0, got {args.workers}")
    results = {}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool = generate(256, image_size=64, seed=0)["images"]
        t0 = time.perf_counter()
        specs = {"shapes": {"shapes": {"num_images": args.num_images, "image_size": 64, "cache_dir": str(root)}}}
        for maker in (make_lsun, make_imagenet, make_voc, make_coco):
            specs.update(maker(root, args.num_images, pool))
        print(f"fixtures: {len(specs)} formats x {args.num_images} images in {time.perf_counter() - t0:.0f} s; "
              f"cpu cores: {os.cpu_count()}", flush=True)
        print(f"{'format':<14}" + "".join(f"{f'{w} workers':>12}" for w in args.workers) + "   (images/s)")
        for name, extra in specs.items():
            data = {"dataset": name, "size": args.size, "flip": True, **{k: str(v) if isinstance(v, Path) else v
                                                                           for k, v in extra.items()}}
            dataset = build_dataset(from_dict(DataConfig, data, "data"), train=True, seed=0)
            rates = [throughput(dataset, w, args.batch_size, args.repeats) for w in args.workers]
            results[name] = {str(w): r for w, r in zip(args.workers, rates)}
            print(f"{name:<14}" + "".join(f"{r:>12.1f}" for r in rates), flush=True)
    need = args.train_batch * args.gpu_steps_per_s
    print(f"needed: {need:.0f} images/s (batch {args.train_batch} x {args.gpu_steps_per_s} GPU steps/s, assumed); "
          f"with cached latents (train.cache_latents) images are decoded once, not per step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "cpu_cores": os.cpu_count(), "images_per_s": results,
                       "needed_images_per_s": need}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
