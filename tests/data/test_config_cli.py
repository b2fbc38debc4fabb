"""DataConfig validation and ``sgdm-ldm validate-data``."""
import pytest
import yaml

from sgdm.cli.main import main
from sgdm.config import ConfigError, from_dict
from sgdm.data import DataConfig
from tests.data import fixtures


def test_defaults_are_valid_and_offline():
    cfg = from_dict(DataConfig, {}, "data")
    assert cfg.dataset == "shapes" and cfg.root is None and cfg.on_bad_image in ("skip", "raise")


@pytest.mark.parametrize("data,key,message", [
    ({"dataset": "voc"}, "data.root", "required for dataset 'voc'"),
    ({"dataset": "cifar"}, "data.dataset", "expected one of"),
    ({"dataset": "shapes", "split": "test"}, "data.split", "has splits train, val"),
    ({"dataset": "lsun_list", "root": "/x"}, "data.list_file", "required"),
    ({"dataset": "coco20k", "root": "/x"}, "data.list_file", "COCO-20K"),
    ({"size": 4}, "data.size", "must be >= 8"),
    ({"on_bad_image": "ignore"}, "data.on_bad_image", "expected one of 'skip', 'raise'"),
    ({"num_workers": -1}, "data.num_workers", ">= 0"),
    ({"max_images": 0}, "data.max_images", ">= 1"),
    ({"folder_labels": True}, "data.folder_labels", "image_folder"),
    # read by voc only: on COCO-20K (crowd boxes) or ImageNet it dropped nothing, without a word
    ({"dataset": "coco20k", "root": "/x", "list_file": "/l", "keep_difficult": False}, "data.keep_difficult", "'voc'"),
    ({"shapes": {"num_images": 0}}, "data.shapes.num_images", ">= 1"),
    ({"shapes": {"image_size": 8}}, "data.shapes.image_size", "[16, 1024]"),
    ({"shapes": {"colour": 1}}, "data.shapes.colour", "unknown key"),
    ({"sise": 64}, "data.sise", "unknown key"),
])
def test_errors_name_the_key(data, key, message):
    with pytest.raises(ConfigError) as info:
        from_dict(DataConfig, data, "data")
    assert info.value.key == key and message in info.value.message


def _write_config(path, data):
    path.write_text(yaml.safe_dump({"run": {"name": "x"}, "data": data}))
    return str(path)


def test_validate_data_lists_exactly_the_bad_files(tmp_path, capsys):
    root = tmp_path / "images"
    fixtures.write_unusual(root)
    bad = fixtures.write_bad(root / "broken")
    config = _write_config(tmp_path / "c.yaml", {"dataset": "image_folder", "root": str(root), "num_workers": 0})
    assert main(["validate-data", config]) == 1
    out = capsys.readouterr().out.splitlines()
    listed = sorted(line.split(": ")[0].removeprefix("BAD ") for line in out if line.startswith("BAD "))
    assert listed == sorted(str(p) for p in bad.values())
    assert out[-1] == f"image_folder (train): 8 of {8 + len(bad)} items are fine, {len(bad)} cannot be read"


def test_validate_data_clean_dataset_with_workers_and_override(tmp_path, capsys):
    list_file = fixtures.make_list_layout(tmp_path)
    config = _write_config(tmp_path / "c.yaml", {"dataset": "lsun_list", "root": str(tmp_path / "images"),
                                                 "list_file": str(list_file)})
    assert main(["validate-data", config, "--workers", "1"]) == 1
    assert "missing.jpg: file does not exist" in capsys.readouterr().out
    assert main(["validate-data", config, "data.max_images=3", "--workers", "0"]) == 0
    assert capsys.readouterr().out.strip().endswith("3 of 3 items are fine, 0 cannot be read")
    assert main(["validate-data", config, "--workers", "-1"]) == 2
    assert "--workers: must be >= 0, got -1" in capsys.readouterr().err


def test_validate_data_split_option(tmp_path, capsys):
    config = _write_config(tmp_path / "c.yaml", {"dataset": "shapes", "num_workers": 0, "shapes": {
        "num_images": 3, "num_val_images": 2, "image_size": 16, "cache_dir": str(tmp_path / "cache")}})
    assert main(["validate-data", config, "--split", "val"]) == 0
    assert capsys.readouterr().out.strip() == "shapes (val): 2 of 2 items are fine, 0 cannot be read"
    assert main(["validate-data", config, "--split", "test"]) == 2
    assert "data.split" in capsys.readouterr().err


def test_validate_data_config_errors_exit_2(tmp_path, capsys):
    config = _write_config(tmp_path / "c.yaml", {"dataset": "image_folder", "root": str(tmp_path / "none")})
    assert main(["validate-data", config]) == 2
    assert "data.root" in capsys.readouterr().err
    config = _write_config(tmp_path / "c.yaml", {"dataset": "image_folder"})
    assert main(["validate-data", config]) == 2
    assert "data.root: required" in capsys.readouterr().err


def test_validate_data_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["validate-data", "--help"])
    assert "1 when at least one is bad" in capsys.readouterr().out


def test_validate_data_path_overrides_take_the_text_as_written(tmp_path, capsys, monkeypatch):
    """A folder named like a number or a date is a path, as in `train` (typed by the schema)."""
    fixtures.write_unusual(tmp_path / "2024")
    config = _write_config(tmp_path / "c.yaml", {"dataset": "image_folder", "root": str(tmp_path / "none"),
                                                 "num_workers": 0})
    monkeypatch.chdir(tmp_path)
    assert main(["validate-data", config, "data.root=2024"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().endswith("8 of 8 items are fine, 0 cannot be read")
