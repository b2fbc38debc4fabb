"""Config errors say where the wrong value was written (file and line, or the override), and a section
written with no keys is its defaults."""
from __future__ import annotations

import dataclasses
import pathlib

import pytest

from sgdm.cli.main import main
from sgdm.config import ConfigError, load_config
from sgdm.config.schema import load_experiment
from sgdm.training.config import TrainConfig

QUICKSTART = pathlib.Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


@dataclasses.dataclass
class Inner:
    steps: int = 1


@dataclasses.dataclass
class Section:
    inner: Inner = dataclasses.field(default_factory=Inner)
    scales: list[float] = dataclasses.field(default_factory=list)
    name: str = "x"


def _error(path, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_experiment(path, list(overrides))
    return info.value


def test_a_wrong_value_in_the_file_names_the_file_and_its_line(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("run:\n  name: a\ntrain:\n  lr: 1.0e-4\n  max_step: 3\n")
    err = _error(config)
    assert err.key == "train.max_step" and str(err).startswith("train.max_step: unknown key")
    assert err.where == f"{config}, line 5"
    config.write_text("train:\n  sample_scales: [1, 2,\n    a]\n")
    assert _error(config).where == f"{config}, line 3"  # a list item: its own line
    config.write_text("train:\n  lr: -1\n")
    assert _error(config).where == f"{config}, line 2"  # a section's own check


def test_a_wrong_value_from_an_override_names_the_override(tmp_path):
    err = _error(QUICKSTART, ["train.lr=-1"])  # the file's lr is fine: the override replaced it
    assert err.key == "train.lr" and err.where == "the override train.lr=-1"
    err = _error(QUICKSTART, ["train.lr=1e-4", "sampler={steps: 10, typo: 1}", "eval.n=512"])
    assert err.key == "sampler.typo" and err.where == "the override sampler={steps: 10, typo: 1}"


def test_a_default_that_does_not_fit_says_it_is_the_default(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("data:\n  size: 64\n")  # the default autoencoder resolution is 256
    err = _error(config)
    assert err.key == "model.autoencoder.resolution"
    assert err.where == f"the default: neither {config} nor an override sets it"


def test_the_cli_prints_where_the_value_was_written(tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text("train:\n  max_step: 3\n")
    known = ", ".join(sorted(f.name for f in dataclasses.fields(TrainConfig)))
    assert main(["train", str(config), "--print-config"]) == 2
    assert capsys.readouterr().err.rstrip().endswith(f"unknown key (known keys here: {known}) ({config}, line 2)")
    assert main(["train", str(config), "train.max_step=4"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("(the override train.max_step=4)")


def test_load_config_says_where_too(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("inner:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"^inner.steps: expected int, got str 'many'$") as info:
        load_config(Section, config)
    assert info.value.where == f"{config}, line 2"
    with pytest.raises(ConfigError, match=r"^inner.steps: expected int, got str 'x'$") as info:
        load_config(Section, config, ["inner.steps=x"])
    assert info.value.where == "the override inner.steps=x"


@pytest.mark.parametrize("text", ["eval:\n", "eval:\n#  n: 512\n", "eval: null\n", "model:\n  unet:\n"])
def test_a_section_written_with_no_keys_takes_its_defaults(tmp_path, text):
    config = tmp_path / "exp.yaml"
    config.write_text(text)
    assert load_experiment(config) == load_experiment(None)
    (tmp_path / "c.yaml").write_text("inner:\n")
    assert load_config(Section, tmp_path / "c.yaml") == Section()


def test_a_yaml_boolean_for_a_text_key_says_to_quote_it(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("run:\n  name: no\n")  # YAML 1.1 reads no, off, yes, on as booleans
    err = _error(config)
    assert err.key == "run.name" and "expected str, got bool False" in str(err)
    assert "put the text in quotes" in str(err)
    assert load_experiment(None, ["run.name=no"]).run.name == "no"  # an override of a text key is text



@pytest.mark.parametrize("text", ["null", "Null", "NULL", "~"])
def test_null_for_a_path_key_without_a_none_is_refused_not_a_folder_named_null(tmp_path, text):
    # ~ is YAML's null too: annotation.store=~ made the home folder itself the store (and "delete the store")
    # in a file `store: null` is refused; the override made a store folder called "null" in the current one
    with pytest.raises(ConfigError, match=r"^annotation.store: expected a path, got NoneType None") as info:
        load_experiment(None, ["data.size=256", f"annotation.store={text}"])
    assert info.value.where == f"the override annotation.store={text}"
    assert load_experiment(None, ["data.size=256", "annotation.store=./null"]).annotation.store.name == "null"
    assert load_experiment(None, ["data.size=256", "run.dir=~/"]).run.dir == pathlib.Path.home()
    assert load_experiment(None, ["data.size=256", "annotation.weights=null"]).annotation.weights is None


@pytest.mark.parametrize("overrides", [["train.betas.0=0.5"], ["train.betas=[0.9, 0.99]", "train.betas.1=0.9"]])
def test_an_override_inside_a_list_says_to_set_the_whole_list(overrides):
    # it said "expected a list, got dict {'0': 0.5}", or "is not a mapping", without the remedy
    with pytest.raises(ConfigError, match=r"^train.betas: is a list: an override sets it whole, "
                                          r"e.g. train.betas=\[0.9, 0.999\]"):
        load_experiment(None, ["data.size=256", *overrides])


def test_a_config_path_from_the_home_folder(tmp_path, monkeypatch):
    # paths inside a config may start with ~/, and so may the config's own path given in Python
    # (load_experiment("~/exp.yaml"), `clusters --config '~/exp.yaml'`): it was "does not exist"
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "exp.yaml").write_text("run:\n  name: home\n")
    assert load_experiment("~/exp.yaml").run.name == "home"


def test_a_report_needs_the_exported_pipeline():
    # the report samples RUN/pipeline (and its companions'): without the export the run trained to the end,
    # then the report stopped on a missing pipeline/ (and each re-run trained the companions again)
    with pytest.raises(ConfigError, match=r"^train.export_pipeline: false, but prepare.report") as info:
        load_experiment(QUICKSTART, ["train.export_pipeline=false"])
    assert info.value.where == "the override train.export_pipeline=false"
    assert not load_experiment(QUICKSTART, ["train.export_pipeline=false", "prepare.report=false"]).prepare.report


def _float_keys(cls, prefix=""):
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
        if dataclasses.is_dataclass(base):
            yield from _float_keys(base, f"{prefix}{f.name}.")
        elif base is float:
            yield prefix + f.name


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", ".inf", "Infinity"])
def test_every_number_key_refuses_a_non_finite_value(value):
    # a dozen sections took nan or inf (annotation.stego.lr, prepare.pretrain.teacher_temp, eval.guidance_scale, ...)
    from sgdm.config.schema import ExperimentConfig

    keys = list(_float_keys(ExperimentConfig))
    assert "prepare.pretrain.teacher_temp" in keys and "eval.guidance_scale" in keys
    for key in keys:  # a section's own check may say more ("must be a finite number > 0, got nan")
        with pytest.raises(ConfigError, match=rf"^{key}: .*got -?(nan|inf)"):
            load_experiment(QUICKSTART, [f"{key}={value}"])
    with pytest.raises(ConfigError, match=r"^eval.guidance_scale: expected a finite number, got -inf"):
        load_experiment(QUICKSTART, ["eval.guidance_scale=-.inf"])
    with pytest.raises(ConfigError, match=r"^train.sample_scales\[1\]: expected a finite number, got nan"):
        load_experiment(QUICKSTART, ["train.sample_scales=[0, .nan]"])


@pytest.mark.parametrize("text", ["32.0", "32."])
def test_a_choice_must_be_one_of_its_values_not_an_equal_number_of_another_type(text):
    # 32.0 == 32 let train.precision: 32.0 through, and the trainer stopped on KeyError '32.0' after prepare
    with pytest.raises(ConfigError, match=r"^train.precision: expected one of 32, '32'"):
        load_experiment(QUICKSTART, [f"train.precision={text}"])
    assert load_experiment(QUICKSTART, ["train.precision=32"]).train.precision_name == "32-true"


def test_the_autoencoder_batch_of_prepare_must_divide_by_its_own_accumulate():
    # prepare trains the autoencoder with prepare.autoencoder_accumulate (it used the run's train.accumulate,
    # and a diffusion run with another accumulate refused the prepared autoencoder)
    with pytest.raises(ConfigError, match=r"^prepare.autoencoder_batch_size: .*prepare.autoencoder_accumulate=3"):
        load_experiment(QUICKSTART, ["prepare.autoencoder_accumulate=3"])
    assert load_experiment(QUICKSTART, ["train.batch_size=96", "train.accumulate=3"]).prepare.autoencoder_accumulate == 1


def test_the_report_steps_cannot_exceed_the_diffusion_steps():
    # sampler.steps, eval.steps and train.sample_steps were checked; the report sampled with more after training
    with pytest.raises(ConfigError, match=r"^prepare.report_steps: 2000 sampling steps exceed diffusion.timesteps=1000"):
        load_experiment(QUICKSTART, ["prepare.report_steps=2000"])
    assert load_experiment(QUICKSTART, ["prepare.report_steps=2000", "prepare.report=false"])


@pytest.mark.parametrize("override, key", [("annotation.weights=null", "annotation.weights"),
                                           ("model.autoencoder.checkpoint=null", "model.autoencoder.checkpoint")])
def test_a_prepare_stage_without_a_file_to_write_is_refused_at_load(override, key):
    # the features stage said so only after the autoencoder had trained (minutes); now before any work
    with pytest.raises(ConfigError, match=rf"^{key}: prepare\.\w+ needs a path to write"):
        load_experiment(QUICKSTART, [override])
    stage = "prepare.features=false" if key == "annotation.weights" else "prepare.autoencoder=false"
    assert load_experiment(QUICKSTART, [override, stage])


def test_a_dotted_key_in_the_file_says_to_nest_it(tmp_path):
    # the command line's train.lr=... written into the file as a key of its own: "unknown key" alone did not say why
    config = tmp_path / "exp.yaml"
    config.write_text("train.lr: 1.0e-4\n")
    err = _error(config)
    assert err.key == "train.lr" and err.where == f"{config}, line 1"
    assert "a dotted key is for overrides; in a file, nest it: train: {lr: ...}" in str(err)


def test_a_seed_beyond_what_a_torch_generator_takes_is_refused():
    # run.seed=2**64 loaded, trained (training hashes it), then the report's torch.Generator().manual_seed(run.seed)
    # stopped with "Overflow when unpacking long long"
    with pytest.raises(ConfigError, match=r"^run.seed: must be >= 0 and < 2\*\*63, got 18446744073709551616"):
        load_experiment(QUICKSTART, [f"run.seed={2**64}"])
    assert load_experiment(QUICKSTART, [f"run.seed={2**63 - 1}"]).run.seed == 2**63 - 1
