"""ImageNet's official flat val folder, read through its ground truth (``data.val_labels``)."""
import logging

import numpy as np
import pytest
import scipy.io
import torch

from sgdm.config import ConfigError, from_dict
from sgdm.data import DataConfig, build_dataset
from sgdm.data.folders import imagenet100_wnids
from tests.data import fixtures

WNIDS = imagenet100_wnids(None, "data")
OTHER = "n99999999"  # a class outside ImageNet-100


def cfg(**kwargs) -> DataConfig:
    kwargs = {k: str(v) if hasattr(v, "as_posix") else v for k, v in kwargs.items()}
    return from_dict(DataConfig, {"dataset": "imagenet100", "split": "val", "size": 16, "num_workers": 0,
                                  **kwargs}, "data")


def flat_val(root, classes: dict[int, str]) -> dict[int, np.ndarray]:
    """root/val/ILSVRC2012_val_<i>.JPEG for each i in ``classes`` (train/ holds one class folder);
    returns each image's pixels as stored."""
    fixtures.make_imagenet(root, [WNIDS[0]])
    for folder in (root / "val").iterdir():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    pixels = {}
    for i in classes:
        pixels[i] = fixtures.sample_rgb(16, 16, seed=i)
        fixtures.Image.fromarray(pixels[i]).save(root / "val" / f"ILSVRC2012_val_{i:08d}.png")
    return pixels


def kaggle_csv(path, classes: dict[int, str]) -> None:
    rows = [f"ILSVRC2012_val_{i:08d},{w} 10 20 30 40 {w} 1 2 3 4 " for i, w in classes.items()]
    path.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")


def image_of(ds, i):
    return torch.as_tensor(ds[i]["image"])


def test_a_kaggle_solution_file_labels_the_flat_val_images_of_the_chosen_classes(tmp_path, caplog):
    classes = {1: WNIDS[3], 2: OTHER, 3: WNIDS[0], 4: WNIDS[3], 5: WNIDS[0]}
    flat_val(tmp_path, {**classes, 6: None})  # image 6 is in no ground truth
    truth = tmp_path / "LOC_val_solution.csv"
    kaggle_csv(truth, {**classes, 7: WNIDS[0]})  # image 7 is missing from the folder
    with caplog.at_level(logging.WARNING, logger="sgdm.data.folders"):
        ds = build_dataset(cfg(root=tmp_path, val_labels=truth), train=False)
    assert ds.ids == [f"ILSVRC2012_val_{i:08d}.png" for i in (1, 3, 4, 5)]  # by file name; OTHER left out
    assert [ds[i]["gt_label"] for i in range(4)] == [3, 0, 3, 0]  # index in the class list
    assert ds.class_names == WNIDS
    plain = build_dataset(cfg(dataset="image_folder", root=tmp_path / "val", split="train"), train=False)
    assert torch.equal(image_of(ds, 1), image_of(plain, plain.ids.index("ILSVRC2012_val_00000003.png")))
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 image(s)" in m and "are not in" in m and "ILSVRC2012_val_00000006.png" in m for m in messages)
    assert any("1 image(s) of these classes" in m and "missing from" in m and "ILSVRC2012_val_00000007" in m
               for m in messages)
    assert build_dataset(cfg(root=tmp_path, val_labels=truth, max_images=2), train=False).ids == ds.ids[:2]


def test_a_name_and_wnid_list_with_extensions_and_no_header(tmp_path):
    flat_val(tmp_path, {1: WNIDS[1], 2: WNIDS[2]})
    truth = tmp_path / "val.txt"
    truth.write_text(f"# made by hand\nILSVRC2012_val_00000002.JPEG\t{WNIDS[2]}\r\nILSVRC2012_val_00000001.png "
                     f"{WNIDS[1]} extra\n")
    ds = build_dataset(cfg(root=tmp_path, val_labels=truth), train=False)
    assert [ds[i]["gt_label"] for i in range(2)] == [1, 2]


def devkit(root, numbers: list[int]):
    """The devkit's data/: ILSVRC2012_validation_ground_truth.txt and meta.mat in its layout (a struct
    array ``synsets``; ids 1..3 are leaves, 1001 an inner node)."""
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(1, WNIDS[5], "a", "", 0, np.zeros(0), 0, 1300), (2, WNIDS[7], "b", "", 0, np.zeros(0), 0, 1300),
            (3, OTHER, "c", "", 0, np.zeros(0), 0, 1300), (1001, "n00001740", "entity", "", 2, np.array([1, 2]), 19, 0)]
    synsets = np.empty(len(rows), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i] = row
    scipy.io.savemat(data / "meta.mat", {"synsets": synsets})
    truth = data / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("".join(f"{n}\n" for n in numbers))
    return truth


def test_the_devkit_ground_truth_with_its_meta_mat(tmp_path):
    flat_val(tmp_path, {1: None, 2: None, 3: None})
    truth = devkit(tmp_path, [2, 3, 1])
    ds = build_dataset(cfg(root=tmp_path, val_labels=truth), train=False)
    assert ds.ids == ["ILSVRC2012_val_00000001.png", "ILSVRC2012_val_00000003.png"]  # 2 is OTHER
    assert [ds[i]["gt_label"] for i in range(2)] == [7, 5]
    truth.write_text("2\n1001\n1\n")  # an inner node is no class of the images
    with pytest.raises(ConfigError, match=r"^data\.val_labels: .* line 2: class number 1001 is not an ILSVRC2012_ID"):
        build_dataset(cfg(root=tmp_path, val_labels=truth))
    (truth.parent / "meta.mat").unlink()
    with pytest.raises(ConfigError, match=r"^data\.val_labels: .* holds class numbers .* expected beside it at "
                                          r".*data/meta\.mat$"):
        build_dataset(cfg(root=tmp_path, val_labels=truth))
    (truth.parent / "meta.mat").write_bytes(b"not a mat file")
    with pytest.raises(ConfigError, match=r"^data\.val_labels: .*meta\.mat is not the devkit's meta\.mat"):
        build_dataset(cfg(root=tmp_path, val_labels=truth))


@pytest.mark.parametrize("text, message", [
    ("ImageId,PredictionString\nILSVRC2012_val_00000001 tench\n", r"line 2: 'ILSVRC2012_val_00000001 tench' is not "
                                                                   r"an image name followed by a WordNet id"),
    (f"a,{WNIDS[0]}\na.JPEG,{WNIDS[1]}\n", r"image a is named twice \(lines 1 and 2\)"),
    ("\n# nothing\n", r"is empty"),
    ("ImageId,PredictionString\n", r"names no image"),
])
def test_a_ground_truth_that_cannot_be_read_is_refused_naming_the_key_and_line(tmp_path, text, message):
    flat_val(tmp_path, {1: None})
    truth = tmp_path / "truth.csv"
    truth.write_text(text)
    with pytest.raises(ConfigError, match=r"^data\.val_labels: .*" + message):
        build_dataset(cfg(root=tmp_path, val_labels=truth))


def test_a_ground_truth_for_other_images_or_classes_is_refused(tmp_path):
    flat_val(tmp_path, {1: None, 2: None})
    truth = tmp_path / "LOC_train_solution.csv"  # the train split's: none of these names
    truth.write_text(f"ImageId,PredictionString\n{WNIDS[0]}_1,{WNIDS[0]} 1 2 3 4\n")
    with pytest.raises(ConfigError, match=r"^data\.val_labels: .* names none of the 2 images of .*val \(first image: "
                                          r"ILSVRC2012_val_00000001\.png, first named: n\d{8}_1\); is it the val"):
        build_dataset(cfg(root=tmp_path, val_labels=truth))
    kaggle_csv(truth, {1: OTHER, 2: OTHER})
    with pytest.raises(ConfigError, match=r"^data\.val_labels: no image of .*val belongs to the 100 classes"):
        build_dataset(cfg(root=tmp_path, val_labels=truth))
    with pytest.raises(ConfigError, match=r"^data\.val_labels: ImageNet val ground truth .*absent\.csv does not exist"):
        build_dataset(cfg(root=tmp_path, val_labels=tmp_path / "absent.csv"))


def test_val_labels_applies_to_the_flat_val_split_of_imagenet100_only(tmp_path):
    fixtures.make_imagenet(tmp_path, [WNIDS[0]])  # val/ in per-class folders
    truth = tmp_path / "LOC_val_solution.csv"
    kaggle_csv(truth, {1: WNIDS[0]})
    with pytest.raises(ConfigError, match=r"^data\.val_labels: .*val is in per-class folders .* remove it$"):
        build_dataset(cfg(root=tmp_path, val_labels=truth))
    train = build_dataset(cfg(root=tmp_path, val_labels=truth, split="train"), train=False)  # the val split's file
    assert train.ids == [f"{WNIDS[0]}/{WNIDS[0]}_{k}.JPEG" for k in range(2)]
    with pytest.raises(ConfigError, match=r"^data\.val_labels: only applies to dataset 'imagenet100'"):
        cfg(dataset="image_folder", root=tmp_path, val_labels=truth)


def test_without_val_labels_the_flat_layout_error_names_the_key(tmp_path):
    flat_val(tmp_path, {1: None})
    with pytest.raises(ConfigError, match=r"^data\.root: .* It holds 1 images directly: ImageNet's official flat val "
                                          r"layout\. Set data\.val_labels to its ground truth"):
        build_dataset(cfg(root=tmp_path))


def test_val_labels_is_recorded_absolute_only_when_set_and_may_change_on_a_resume(tmp_path, monkeypatch):
    from sgdm.annotation.annotate import data_settings
    from sgdm.training.resume import resume_differences

    monkeypatch.chdir(tmp_path)
    assert "data.val_labels" not in data_settings(cfg(root=tmp_path))  # records made before the key still fit
    assert data_settings(cfg(root=tmp_path, val_labels="LOC_val_solution.csv"))["data.val_labels"] == \
        str(tmp_path / "LOC_val_solution.csv")
    # training reads the train split, so the val split's ground truth may be set later
    assert resume_differences({"data": {"dataset": "imagenet100"}},
                              {"data": {"dataset": "imagenet100", "val_labels": "/data/LOC_val_solution.csv"}}) == []
