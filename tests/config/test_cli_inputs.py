"""Config loading and the CLI as a user meets them: numbers, home-relative paths, config files, typos."""
from __future__ import annotations

import dataclasses
import pathlib

import pytest

from sgdm.cli.main import main
from sgdm.config import ConfigError, apply_overrides, from_dict, load_config, load_yaml
from sgdm.config.schema import load_experiment


@dataclasses.dataclass
class Section:
    steps: int = 1
    lr: float = 1.0
    name: str = "x"
    where: pathlib.Path = pathlib.Path("here")


@pytest.mark.parametrize("text, value", [("010", 10), ("0010", 10), ("-010", -10), ("0", 0), ("0x10", 16),
                                         ("1_000", 1000), ("1e3", 1000), ("08", 8), ("-09", -9)])
def test_an_int_with_leading_zeros_is_decimal_not_octal(tmp_path, text, value):
    # YAML 1.1 (PyYAML) reads 010 as octal 8: train.max_steps=010 would train 8 steps
    assert load_config(Section, None, [f"steps={text}"]).steps == value
    (tmp_path / "c.yaml").write_text(f"steps: {text}\n")
    assert load_config(Section, tmp_path / "c.yaml").steps == value


def test_a_float_with_a_leading_zero_and_a_sexagesimal_number():
    assert load_config(Section, None, ["lr=010"]).lr == 10.0
    assert load_config(Section, None, ["lr=010.5"]).lr == 10.5
    # YAML 1.1 reads 1:30 as 90 (base 60); as text it is refused for a number and kept for a string
    with pytest.raises(ConfigError, match=r"^steps: expected int, got str '1:30'"):
        load_config(Section, None, ["steps=1:30"])
    data = apply_overrides({}, ["other=1:30"])
    assert data == {"other": "1:30"}


def test_a_file_keeps_sexagesimal_text_for_a_string(tmp_path):
    (tmp_path / "c.yaml").write_text("name: 1:30\n")
    assert load_config(Section, tmp_path / "c.yaml").name == "1:30"


def test_printed_config_with_numeric_looking_strings_loads_back(tmp_path, capsys):
    config = pathlib.Path(__file__).parents[2] / "configs" / "shapes_cpu.yaml"
    assert main(["train", str(config), "--print-config", "run.name=010", "run.dir=1:30", "data.root=09"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    cfg = load_experiment(printed)
    assert cfg.run.name == "010" and cfg.run.dir.name == "1:30" and cfg.data.root.name == "09"


def test_home_relative_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert load_config(Section, None, ["where=~/runs"]).where == tmp_path / "home" / "runs"
    (tmp_path / "c.yaml").write_text("where: ~/data\n")
    assert from_dict(Section, load_yaml(tmp_path / "c.yaml")).where == tmp_path / "home" / "data"
    cfg = load_experiment(None, ["run.dir=~/runs", "data.size=256"])
    assert cfg.run.dir == tmp_path / "home" / "runs"
    assert not (tmp_path / "~").exists()


def test_a_folder_given_as_the_config_file_is_said_so(tmp_path, capsys):
    with pytest.raises(ConfigError, match="is a folder"):
        load_yaml(tmp_path)
    assert main(["train", str(tmp_path), "--print-config"]) == 2
    assert f"{tmp_path} is a folder" in capsys.readouterr().err


def _shapes_config(tmp_path) -> pathlib.Path:
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  dataset: shapes\n  max_images: 4\n  size: 32\n")
    return config


@pytest.mark.parametrize("override, key", [("dta.root=/x", "dta"), ("data.rot=/x", "data.rot"),
                                           ("run.nme=a", "run.nme"), ("model.unet.chanels=3", "model.unet.chanels")])
def test_validate_data_refuses_a_misspelt_key(tmp_path, capsys, override, key):
    # a misspelt data key must not validate the dataset the user did not mean
    assert main(["validate-data", str(_shapes_config(tmp_path)), override, "--workers", "0"]) == 2
    assert f"config error: {key}: unknown key" in capsys.readouterr().err


def test_validate_data_refuses_a_misspelt_section_in_the_file(tmp_path, capsys):
    config = _shapes_config(tmp_path)
    config.write_text(config.read_text() + "trian:\n  lr: 1\n")
    assert main(["validate-data", str(config), "--workers", "0"]) == 2
    assert "config error: trian: unknown key" in capsys.readouterr().err


def test_validate_data_takes_the_train_commands_overrides(tmp_path, capsys):
    # the README's flow: the same overrides as `train`, the other sections unread
    assert main(["validate-data", str(_shapes_config(tmp_path)), "run.name=mine", "train.lr=1e-4",
                 "annotation.backbone_kwargs.img_size=32", "--workers", "0"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("written", ["1e-1", "1.5e-1", "-2e-1"])
def test_scientific_numbers_in_backbone_kwargs_are_numbers(tmp_path, written):
    # PyYAML reads 1e-1 (no dot) as text; timm would get drop_rate='1e-1'
    cfg = load_experiment(None, [f"annotation.backbone_kwargs.drop_rate={written}", "data.size=256"])
    assert cfg.annotation.backbone_kwargs == {"drop_rate": float(written)}
    config = tmp_path / "c.yaml"
    config.write_text(f"annotation:\n  backbone_kwargs: {{drop_path_rate: {written}}}\n")
    assert load_experiment(config).annotation.backbone_kwargs == {"drop_path_rate": float(written)}


@pytest.mark.parametrize("override", ["where=", "where=''"])
def test_an_empty_path_is_refused_not_the_current_folder(override):
    with pytest.raises(ConfigError, match=r"^where: empty path"):
        load_config(Section, None, [override])


def test_a_comma_separated_list_says_how_to_write_it():
    # the commas of eval --sweep-scale 0,1,2 do not make a list in an override
    with pytest.raises(ConfigError, match=r"^model.unet.channel_mult: expected a list, got str '1,2'; write "
                                          r"\[1,2\]"):
        load_experiment(None, ["model.unet.channel_mult=1,2"])
    with pytest.raises(ConfigError, match=r"^train.betas: .*; write \[0.9,0.99\]"):
        load_experiment(None, ["train.betas=0.9,0.99"])


@pytest.mark.parametrize("command", ["train", "train-autoencoder", "annotate", "validate-data", "pretrain-features"])
def test_the_override_example_in_each_help_loads(command):
    # annotate's example was annotation.num_classes=50 alone, which every guided config refuses
    from sgdm.cli.main import build_parser

    sub = build_parser(only=command).subcommand_parsers[command]
    text = next(a.help for a in sub._actions if a.dest == "overrides")
    example = text.split("e.g. ", 1)[1].split()
    config = pathlib.Path(__file__).parents[2] / "configs" / "quickstart.yaml"
    load_experiment(config, example)


def test_a_negative_first_number_in_a_list_flag_is_its_value(tmp_path, capsys):
    # argparse took -1,0 for an option and said "--sweep-scale: expected one argument"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("eval:\n  n: 10\n")
    assert main(["eval", str(run), "--sweep-scale", "-1,0,1", "--n", "1"]) == 2
    assert "--n (eval.n)" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing"), "--box", "-0.5,0,1,1", "-o", str(tmp_path / "s.png")]) == 1
    assert "missing" in capsys.readouterr().err


def test_a_config_piped_in_loads(tmp_path):
    # sgdm-ldm train CONFIG --print-config ... | sgdm-ldm train /dev/stdin: a pipe is no regular file
    import os

    read, write = os.pipe()
    os.write(write, b"run:\n  name: piped\n")
    os.close(write)
    try:
        assert load_yaml(f"/proc/self/fd/{read}") == {"run": {"name": "piped"}}
    finally:
        os.close(read)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_the_quickstart_header_does_not_ask_for_resume():
    # `sgdm-ldm train` continues a self-preparing config's own run from its last checkpoint (cli/train.py)
    header = (pathlib.Path(__file__).parents[2] / "configs" / "quickstart.yaml").read_text().split("\nrun:")[0]
    assert "add --resume" not in header and "continues the run itself" in " ".join(header.replace("#", " ").split())


def test_train_autoencoder_help_names_the_train_keys_it_reads():
    # it reads the trainer's keys as `train` does; train.betas, warmup_steps, ema_* are the denoiser's
    from sgdm.cli.train_autoencoder import DESCRIPTION

    text = "".join(DESCRIPTION.split())
    keys = text.split("train.{", 1)[1].split("}", 1)[0].split(",")
    assert {"accelerator", "num_nodes", "keep_checkpoints", "log_every"} <= set(keys)
    assert not {"betas", "warmup_steps", "ema_decay"} & set(keys)


@pytest.mark.parametrize("kind, given, takes", [("label", {"box": [0.1, 0.1, 0.5, 0.5]}, "--cluster"),
                                                ("mask", {"cluster": 1}, "--mask"),
                                                ("box", {"mask": [[0]]}, "--cluster and --box")])
def test_sample_says_which_flags_a_model_takes(kind, given, takes):
    # `sample --box` on a label model ended "it takes cluster", naming no flag the command has
    from sgdm.cli.sample import _flag_names
    from sgdm.models.config import GuidanceConfig
    from sgdm.pipeline import parse_guidance

    with pytest.raises(ValueError) as caught:
        parse_guidance(GuidanceConfig(kind=kind, num_classes=4), 1, (8, 8), (32, 32), **given)
    assert _flag_names(str(caught.value)).endswith(f"it takes {takes}")


@pytest.mark.parametrize("flag", [False, True])
def test_pretrain_features_never_replaces_an_existing_weights_file(tmp_path, capsys, monkeypatch, flag):
    # the paper configs' annotation.weights is DINO's downloaded ViT-B/16: `pretrain-features CONFIG` replaced it
    # with a few hundred steps of its own, without a word (train-autoencoder never overwrites its file)
    import yaml

    import sgdm.features_pretrain.train as pretrain_train
    from tests.evaluation.helpers import tiny_config

    trained = []
    monkeypatch.setattr(pretrain_train, "pretrain_features", lambda *a, **k: trained.append(a) or a[4])
    raw = tiny_config(tmp_path, "label")
    weights = pathlib.Path(raw["annotation"]["weights"])
    weights.write_bytes(b"DINO's weights")
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = ["--out", str(weights)] if flag else []
    assert main(["pretrain-features", str(config), *out]) == 2
    err = capsys.readouterr().err
    assert f"config error: {'--out' if flag else 'annotation.weights'}: {weights} exists" in err
    assert not trained and weights.read_bytes() == b"DINO's weights"
    assert main(["pretrain-features", str(config), "--out", str(tmp_path / "mine.safetensors")]) == 0 and trained
