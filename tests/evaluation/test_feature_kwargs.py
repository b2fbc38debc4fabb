"""`sgdm-ldm eval`: the feature extractor's backbone kwargs on the command line
(--feature-backbone-kwargs), and backbone errors that name eval's keys, not annotation's."""
import argparse
import json

import pytest

from sgdm.cli.main import main
from tests.evaluation.helpers import TINY_VIT, make_run

NAME = "vit_tiny_patch16_224"
KWARGS_TEXT = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"  # YAML, as a user types it


def _config(run_eval: dict, *flags: str):
    from sgdm.cli.evaluate import add_parser, eval_config_from_args

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    return eval_config_from_args(run_eval, parser.parse_args(["RUN", *flags]))


def test_feature_backbone_kwargs_flag_builds_a_small_encoder(tmp_path):
    """--feature-extractor cleared eval.feature_backbone_kwargs and no flag set them, so an encoder built
    with kwargs (the quickstart's own) could not be the distance's extractor from the command line. Given
    with the flag, it is the same extractor as the run's annotation backbone: the same distance."""
    run_dir = make_run(tmp_path, "label")
    assert main(["eval", str(run_dir), "--metrics", "fd"]) == 0
    default = json.loads((run_dir / "eval" / "results.json").read_text())
    assert main(["eval", str(run_dir), "--metrics", "fd", "--feature-extractor", NAME, "--feature-weights",
                 str(tmp_path / "enc.safetensors"), "--feature-backbone-kwargs", KWARGS_TEXT,
                 "--feature-name", "own"]) == 0
    own = json.loads((run_dir / "eval" / "results.json").read_text())
    (row_default,), (row_own,) = default["results"], own["results"]
    assert row_own["fd_own"] == pytest.approx(row_default["fd_tiny"], rel=1e-6, abs=1e-9)


def test_feature_backbone_kwargs_flag_is_parsed_as_yaml():
    ecfg = _config({}, "--feature-extractor", NAME, "--feature-backbone-kwargs", "{img_size: 16, patch_size: 4}")
    assert ecfg.feature_backbone_kwargs == {"img_size": 16, "patch_size": 4}
    # the run's eval: section names the extractor: the flag replaces its kwargs
    recorded = {"feature_backbone": NAME, "feature_backbone_kwargs": {"depth": 3}}
    assert _config(recorded, "--feature-backbone-kwargs", "{depth: 1}").feature_backbone_kwargs == {"depth": 1}
    assert _config(recorded).feature_backbone_kwargs == {"depth": 3}
    # another extractor without the flag: the run's kwargs belong to the run's extractor, not to it
    assert _config(recorded, "--feature-extractor", "resnet18").feature_backbone_kwargs == {}


@pytest.mark.parametrize("text, message", [
    ("{img_size:16}", r"^--feature-backbone-kwargs \(eval\.feature_backbone_kwargs\.img_size:16\): .*holds a colon"),
    ("32", r"^--feature-backbone-kwargs \(eval\.feature_backbone_kwargs\): expected a mapping"),
    ("{img_size: [16", r"^--feature-backbone-kwargs \(eval\.feature_backbone_kwargs\): cannot parse"),
    ("{img_size: }", r"^--feature-backbone-kwargs \(eval\.feature_backbone_kwargs\.img_size\): null value"),
])
def test_bad_feature_backbone_kwargs_name_the_flag(text, message):
    from sgdm.config.core import ConfigError

    with pytest.raises(ConfigError, match=message):
        _config({}, "--feature-extractor", NAME, "--feature-backbone-kwargs", text)


def test_feature_backbone_kwargs_without_an_extractor_are_refused():
    """Without eval.feature_backbone the distance uses the annotation backbone with annotation.backbone_kwargs:
    the flag's kwargs would be dropped without a word."""
    from sgdm.config.core import ConfigError

    with pytest.raises(ConfigError, match=r"^--feature-backbone-kwargs: .*--feature-extractor NAME"):
        _config({}, "--feature-backbone-kwargs", "{depth: 1}")


def test_help_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--feature-backbone-kwargs" in out and "eval.feature_backbone_kwargs" in out


def test_eval_extractor_mismatch_names_eval_keys(tmp_path, capsys):
    """The small encoder under --feature-extractor without its kwargs: the error told the user to set
    annotation.backbone / annotation.backbone_kwargs, which eval does not read for its own extractor."""
    run_dir = make_run(tmp_path, "label")
    assert main(["eval", str(run_dir), "--metrics", "fd", "--feature-extractor", NAME, "--feature-weights",
                 str(tmp_path / "enc.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "annotation." not in err, err
    assert ("build it with a vit_* --feature-extractor (eval.feature_backbone) and --feature-backbone-kwargs "
            "'{embed_dim: 32, depth: 1, patch_size: 4, img_size: 16, num_heads: N}' (eval.feature_backbone_kwargs)"
            in err), err
    assert ("check --feature-extractor (eval.feature_backbone) / --feature-backbone-kwargs "
            "(eval.feature_backbone_kwargs)" in err), err


def test_eval_extractor_errors_name_eval_keys(tmp_path, monkeypatch):
    """The loader's other messages (kwargs timm refuses, no weights offline) name eval's keys too."""
    import sgdm.annotation.features as features
    from sgdm.annotation.features import BackboneError
    from sgdm.evaluation.evaluate import _feature_space
    from sgdm.config.schema import load_experiment

    run_dir = make_run(tmp_path, "label")
    cfg = load_experiment(run_dir / "config.yaml")
    weights = ["--feature-weights", str(tmp_path / "enc.safetensors")]
    with pytest.raises(BackboneError, match=r"bad --feature-backbone-kwargs \(eval\.feature_backbone_kwargs\)"):
        _feature_space(cfg, _config({}, "--feature-extractor", NAME, *weights,
                                    "--feature-backbone-kwargs", "{no_such_argument: 1}"))
    monkeypatch.setattr(features, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(features, "cached_pretrained_file", lambda name: None)
    with pytest.raises(BackboneError, match=r"no local weights given \(--feature-weights \(eval\.feature_weights\)\)"
                                            r".*set --feature-weights \(eval\.feature_weights\) to a \.pth"):
        _feature_space(cfg, _config({}, "--feature-extractor", NAME, "--feature-backbone-kwargs", KWARGS_TEXT))


def test_annotation_messages_keep_annotation_keys(tmp_path):
    """The loader's default keys are the annotation section's, as before: annotate names annotation.*."""
    from sgdm.annotation.features import BackboneError, load_backbone

    make_run(tmp_path, "label")
    with pytest.raises(BackboneError) as info:
        load_backbone(NAME, tmp_path / "enc.safetensors", {})
    message = str(info.value)
    assert ("build it with a vit_* annotation.backbone and annotation.backbone_kwargs={embed_dim: 32, depth: 1, "
            "patch_size: 4, img_size: 16, num_heads: N}" in message), message
    assert "check annotation.backbone / annotation.backbone_kwargs" in message and "eval." not in message, message
