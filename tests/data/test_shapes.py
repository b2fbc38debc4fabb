"""The built-in shapes dataset: deterministic, cached, ground truth consistent with the pixels."""
import numpy as np
import pytest
import torch

from sgdm.data import DataConfig, build_dataset, collate_samples
from sgdm.data.shapes import CLASS_NAMES, CHUNK, COLOURS, generate, load_or_generate
from sgdm.config import from_dict


@pytest.fixture(scope="module")
def arrays():
    return generate(CHUNK + 20, image_size=48, seed=5)


def test_generation_is_deterministic_and_prefix_stable(arrays):
    again = generate(30, image_size=48, seed=5)
    for key in arrays:
        assert np.array_equal(again[key], arrays[key][:30]), key  # image i does not depend on N
    other = generate(30, image_size=48, seed=6)
    assert not np.array_equal(other["images"], arrays["images"][:30])
    val = generate(30, image_size=48, seed=5, split="val")
    assert not np.array_equal(val["images"], arrays["images"][:30])


def test_at_least_eight_classes_and_one_to_three_objects(arrays):
    assert len(CLASS_NAMES) >= 8 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    counts = (arrays["box_labels"] >= 0).sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= 3 and len(np.unique(counts)) == 3
    assert len(np.unique(arrays["box_labels"][arrays["box_labels"] >= 0])) == len(CLASS_NAMES)


def test_boxes_are_tight_on_each_objects_mask_and_label_is_the_largest(arrays):
    for i in range(40):
        masks, boxes, labels = arrays["masks"][i], arrays["boxes"][i], arrays["box_labels"][i]
        areas = {}
        for slot in np.flatnonzero(labels >= 0):
            x1, y1, x2, y2 = boxes[slot].astype(int)
            inside = masks[y1:y2, x1:x2] == labels[slot] + 1
            # every box edge row/column touches the object; objects never overlap
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            areas[slot] = inside.sum()
        assert sum(areas.values()) == (masks > 0).sum()
        largest = max(areas, key=areas.get)
        assert arrays["labels"][i] == labels[largest]


def test_objects_have_their_class_colour(arrays):
    palette = np.array(list(COLOURS.values()), dtype=float)
    for i in range(40):
        for c in np.unique(arrays["masks"][i]):
            if c == 0:
                continue
            mean = arrays["images"][i][arrays["masks"][i] == c].astype(float).mean(axis=0)
            colour = (int(c) - 1) % len(COLOURS)
            assert np.argmin(np.linalg.norm(palette - mean, axis=1)) == colour


def test_backgrounds_vary(arrays):
    background = [arrays["images"][i][arrays["masks"][i] == 0].std(axis=0).mean() for i in range(40)]
    means = [arrays["images"][i][arrays["masks"][i] == 0].mean() for i in range(40)]
    assert np.std(means) > 10 and np.median(background) > 5  # varied tints, textured


def test_cache_is_written_once_and_reused(tmp_path):
    first = load_or_generate(10, 32, 1, "train", tmp_path)
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and isinstance(first["images"], np.memmap)
    np.save(folders[0] / "labels.npy", np.full(10, 7, dtype=np.int16))  # prove the second call reads the cache
    assert (load_or_generate(10, 32, 1, "train", tmp_path)["labels"] == 7).all()
    load_or_generate(11, 32, 1, "train", tmp_path)  # other parameters, other entry
    assert len(list(tmp_path.iterdir())) == 2


def test_samples_follow_the_contract(tmp_path):
    cfg = from_dict(DataConfig, {"size": 32, "shapes": {"num_images": 6, "num_val_images": 3, "image_size": 32,
                                                         "cache_dir": str(tmp_path)}}, "data")
    train = build_dataset(cfg, train=True, seed=0)
    val = build_dataset(cfg, train=False, split="val")
    assert len(train) == 6 and len(val) == 3 and train.num_classes == len(CLASS_NAMES)
    assert train.mask_class_names[0] == "background"
    sample = val[0]
    assert sample["id"] == "shapes-32px-seed0-val-000000" and sample["flipped"] is False
    assert sample["image"].shape == (3, 32, 32) and sample["gt_mask"].shape == (32, 32)
    assert sample["gt_multi_hot"].sum() == len(torch.unique(sample["gt_box_labels"]))
    batch = collate_samples([train[i] for i in range(6)])
    assert batch["image"].shape == (6, 3, 32, 32) and len(batch["gt_boxes"]) == 6 and batch["num_skipped"] == 0


def test_flips_follow_seed_and_epoch_and_move_the_ground_truth(tmp_path):
    cfg = from_dict(DataConfig, {"size": 32, "shapes": {"num_images": 40, "image_size": 32,
                                                         "cache_dir": str(tmp_path)}}, "data")
    a, b, plain = build_dataset(cfg, True, seed=1), build_dataset(cfg, True, seed=1), build_dataset(cfg, False)
    flips = [a[i]["flipped"] for i in range(40)]
    assert flips == [b[i]["flipped"] for i in range(40)] and 5 < sum(flips) < 35
    a.set_epoch(1)
    assert [a[i]["flipped"] for i in range(40)] != flips
    i = flips.index(True)
    b_sample, p_sample = b[i], plain[i]
    assert torch.equal(b_sample["image"], p_sample["image"].flip(-1))
    assert torch.equal(b_sample["gt_mask"], p_sample["gt_mask"].flip(-1))
    x1, y1, x2, y2 = p_sample["gt_boxes"].unbind(1)
    assert torch.equal(b_sample["gt_boxes"], torch.stack([32 - x2, y1, 32 - x1, y2], 1))


def test_resized_output(tmp_path):
    cfg = from_dict(DataConfig, {"size": 16, "shapes": {"num_images": 2, "image_size": 32,
                                                         "cache_dir": str(tmp_path)}}, "data")
    sample = build_dataset(cfg, False)[0]
    assert sample["image"].shape == (3, 16, 16) and sample["gt_mask"].shape == (16, 16)
    assert float(sample["gt_boxes"].max()) <= 16


def test_pickling_reopens_the_cache_instead_of_copying_it(tmp_path):
    import pickle

    cfg = from_dict(DataConfig, {"size": 32, "shapes": {"num_images": 4, "image_size": 32,
                                                         "cache_dir": str(tmp_path)}}, "data")
    ds = build_dataset(cfg, False)
    blob = pickle.dumps(ds)
    assert len(blob) < 4 * 32 * 32 * 3  # not even one copy of the images
    assert torch.equal(pickle.loads(blob)[3]["image"], ds[3]["image"])
