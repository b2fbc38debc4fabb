"""``scan_images``: which files of an image-folder tree become dataset ids."""
import pytest
from PIL import Image

from sgdm.config import ConfigError, from_dict
from sgdm.data import DataConfig, build_dataset
from sgdm.data.decode import IMAGE_EXTENSIONS
from sgdm.data.folders import scan_images
from tests.data import fixtures


def save(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(fixtures.sample_rgb(16, 12, seed=seed)).save(path)


def test_hidden_folders_are_skipped_like_hidden_files(tmp_path):
    for name in ("a.png", ".b.png", ".thumbnails/c.png", "sub/d.png", "sub/.cache/e.png"):
        save(tmp_path / name)
    assert scan_images(tmp_path) == ["a.png", "sub/d.png"]
    save(tmp_path / "classes" / "cats" / "f.png")
    save(tmp_path / "classes" / ".ipynb_checkpoints" / "g.png")
    labelled = from_dict(DataConfig, {"dataset": "image_folder", "root": str(tmp_path / "classes"),
                                      "folder_labels": True, "size": 8, "num_workers": 0}, "data")
    dataset = build_dataset(labelled, train=False)
    assert dataset.ids == ["cats/f.png"] and dataset.class_names == ["cats"]  # no hidden class


def test_no_images_message_lists_every_accepted_extension(tmp_path):
    save(tmp_path / ".hidden" / "only.png")
    data = from_dict(DataConfig, {"dataset": "image_folder", "root": str(tmp_path), "size": 8}, "data")
    with pytest.raises(ConfigError, match=r"^data\.root: no images found") as info:
        build_dataset(data)
    assert all(ext in str(info.value) for ext in IMAGE_EXTENSIONS) and "hidden" in str(info.value)


def test_a_symlink_cycle_is_walked_once_with_one_warning(tmp_path, caplog):
    import logging

    root = tmp_path / "root"
    for name in ("root/a.png", "root/sub/b.png", "outside/c.png"):
        save(tmp_path / name)
    (root / "sub" / "loop").symlink_to("..", target_is_directory=True)  # a cycle
    (root / "alias").symlink_to("sub", target_is_directory=True)  # a second way into sub/
    (root / "sub" / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)  # the only way there
    with caplog.at_level(logging.WARNING, logger="sgdm.data.folders"):
        # the real path wins over a link (alias/ sorts first); outside/ is read through its link
        assert scan_images(root) == ["a.png", "sub/b.png", "sub/linked/c.png"]
    warnings = [r.getMessage() for r in caplog.records if "reached again through symlinks" in r.getMessage()]
    assert len(warnings) == 1 and "2 folder(s)" in warnings[0]


LATIN1 = b"caf\xe9.png"  # a Latin-1 name, common in old archives; not valid UTF-8


def test_a_name_that_is_not_utf8_is_read_and_reported_by_its_bytes(tmp_path, capsys):
    import os

    from sgdm.cli.main import main

    root = tmp_path / "imgs"
    save(root / "a.png")
    save(root / os.fsdecode(LATIN1))
    name = os.fsdecode(LATIN1)  # 'caf\udce9.png', as os.walk gives it
    data = {"dataset": "image_folder", "root": str(root), "size": 8, "num_workers": 0}
    dataset = build_dataset(from_dict(DataConfig, data, "data"), train=False)
    assert dataset.ids == ["a.png", name] and dataset.check(1) is None
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"a.png\n" + LATIN1 + b"\n")  # a list file in the archive's encoding names the same file
    dataset = build_dataset(from_dict(DataConfig, {**data, "list_file": str(listed)}, "data"), train=False)
    assert dataset.ids == ["a.png", name] and dataset.check(1) is None
    (root / name).write_bytes(b"not an image")  # validate-data names it readably (stdout is strict UTF-8)
    config = tmp_path / "data.yaml"
    config.write_text(f"data: {{dataset: image_folder, root: {root}, num_workers: 0}}\n")
    assert main(["validate-data", str(config)]) == 1
    assert "BAD " + str(root / "caf\\xe9.png") + ": not an image" in capsys.readouterr().out
