"""`sgdm-ldm eval` on tiny runs: plumbing with a random-weight Inception, and bad input."""
import json

import pytest
import torch

from sgdm.cli.main import main
from tests.evaluation.helpers import make_run


def test_eval_with_local_inception_writes_json_and_markdown(tmp_path, inception_weights):
    run_dir = make_run(tmp_path, "label")
    code = main(["eval", str(run_dir), "--inception-weights", str(inception_weights), "--n", "4", "--batch-size", "4",
                 "--sampler", "ddpm", "--steps", "2", "--guidance-scale", "3"])
    assert code == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["sampler"] == "ddpm" and results["steps"] == 2 and results["n"] == 4 and results["weights"] == "ema"
    assert results["spacing"] == "linspace" and results["adherence_extractor"] is None  # label: no adherence
    (row,) = results["results"]
    assert row["guidance_scale"] == 3.0
    assert {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "fd_tiny"} <= set(row)
    assert row["fid"] > 0 and row["fd_tiny"] > 0
    table = (run_dir / "eval" / "results.md").read_text()
    assert "| fid |" in table and "fd_tiny" in table and "not FID" in table
    cache = run_dir / "eval" / "cache"
    assert list(cache.glob("fd-tiny-*.pt")) and list(cache.glob("sgdm-*"))  # reference statistics cached
    again = main(["eval", str(run_dir), "--inception-weights", str(inception_weights), "--n", "4", "--batch-size", "4",
                  "--sampler", "ddpm", "--steps", "2", "--guidance-scale", "3", "--metrics", "fid"])
    assert again == 0
    assert json.loads((run_dir / "eval" / "results.json").read_text())["results"][0]["fid"] == pytest.approx(row["fid"], rel=1e-5)


def test_eval_sweep_plots_metric_against_scale(tmp_path):
    run_dir = make_run(tmp_path, "label")
    assert main(["eval", str(run_dir), "--metrics", "fd", "--sweep-scale", "0,1,4"]) == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert [r["guidance_scale"] for r in results["results"]] == [0.0, 1.0, 4.0]
    assert (run_dir / "eval" / "sweep.png").stat().st_size > 0


def test_eval_box_run_reports_layout_adherence(tmp_path):
    run_dir = make_run(tmp_path, "box", sampler={"spacing": "trailing"})
    assert main(["eval", str(run_dir), "--metrics", "fd,adherence", "--guidance-scale", "1.5"]) == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    row = results["results"][0]
    assert row["guidance_scale"] == 1.5 and 0 <= row["box_iou"] <= 1 and "box_hit50" in row
    # how the samples were drawn and re-annotated: the spacing the run's sampler config resolves to
    # (eval.spacing unset) and the extractor f ran on
    assert results["spacing"] == "trailing" and "(trailing spacing)" in (run_dir / "eval" / "results.md").read_text()
    assert results["adherence_extractor"]["input_size"] == [16, 16]
    assert results["annotation_store"] == str(tmp_path / "store-box")



def test_eval_layout_adherence_runs_on_the_annotation_backbone(tmp_path, monkeypatch):
    # fd in another encoder's space (--feature-weights) must not move f: LOST still runs on
    # the features the guiding boxes were annotated from
    import torch

    import sgdm.evaluation.adherence as adherence
    from sgdm.annotation.features import file_sha256
    from sgdm.features_pretrain.train import build_backbone, save_backbone
    from tests.evaluation.helpers import TINY_VIT

    run_dir = make_run(tmp_path, "box")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other = save_backbone(build_backbone("vit_tiny_patch16_224", TINY_VIT), tmp_path / "other.safetensors",
                              "vit_tiny_patch16_224", TINY_VIT)
    seen = {}
    real = adherence.box_adherence

    def spy(space, *args, **kwargs):
        seen["weights"] = space.backbone.weights_id
        return real(space, *args, **kwargs)

    monkeypatch.setattr(adherence, "box_adherence", spy)
    assert main(["eval", str(run_dir), "--metrics", "fd,adherence", "--guidance-scale", "1.5",
                 "--feature-weights", str(other)]) == 0
    assert seen["weights"] == file_sha256(tmp_path / "enc.safetensors") != file_sha256(other)
    assert "fd_tiny" in json.loads((run_dir / "eval" / "results.json").read_text())["results"][0]

def test_eval_unguided_run_has_one_row_without_scale(tmp_path):
    run_dir = make_run(tmp_path, "none")
    assert main(["eval", str(run_dir), "--metrics", "fd", "--feature-name", "tiny_{dataset}"]) == 0
    rows = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    assert len(rows) == 1 and rows[0]["guidance_scale"] is None
    assert "fd_tiny_shapes" in rows[0]  # {dataset}: data.dataset


def test_eval_run_without_ema_weights_is_refused(tmp_path, capsys):
    run_dir = make_run(tmp_path, "label", export=False)
    assert main(["eval", str(run_dir), "--metrics", "fd"]) == 1
    assert "no EMA weights" in capsys.readouterr().err


def test_eval_n_smaller_than_batch_is_a_config_error(tmp_path, capsys):
    run_dir = make_run(tmp_path, "label")
    assert main(["eval", str(run_dir), "--n", "2", "--batch-size", "4"]) == 2
    # the values came from flags: the error names them (and the key)
    assert "--n (eval.n): 2 samples is smaller than the batch size 4" in capsys.readouterr().err


def test_eval_small_n_alone_is_one_batch(tmp_path):
    """`--n` below the run's eval.batch_size, without --batch-size, samples one batch of n: the run's
    batch size is a default the user did not choose, so it is no conflict (only a --batch-size > --n is)."""
    from sgdm.cli.evaluate import eval_config_from_args
    from sgdm.cli.main import build_parser

    def config(run_eval, *flags):
        ecfg = eval_config_from_args(run_eval, build_parser("eval").parse_args(["eval", "RUN", *flags]))
        return ecfg.n, ecfg.batch_size

    assert config({"n": 512, "batch_size": 128}, "--n", "32") == (32, 32)
    assert config({"n": 512}, "--n", "8") == (8, 8)  # under the default batch size, 64
    assert config({"n": 512, "batch_size": 16}, "--n", "32") == (32, 16)
    run_dir = make_run(tmp_path, "box")  # its eval.batch_size is 3
    assert main(["eval", str(run_dir), "--n", "2", "--metrics", "adherence"]) == 0
    assert json.loads((run_dir / "eval" / "results.json").read_text())["n"] == 2


def test_eval_missing_weights_files_are_named(tmp_path, capsys):
    run_dir = make_run(tmp_path, "label")
    assert main(["eval", str(run_dir), "--inception-weights", str(tmp_path / "nope.pth")]) == 2
    assert "--inception-weights (eval.inception_weights): file" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--metrics", "fd", "--feature-extractor", "vit_tiny_patch16_224",
                 "--feature-weights", str(tmp_path / "enc-missing.pth")]) == 2
    assert "--feature-weights (eval.feature_weights): file" in capsys.readouterr().err


def test_inception_weights_without_an_inception_metric_are_refused(tmp_path):
    """--inception-weights with metrics that never read them was ignored without a word (the user expected
    an FID)."""
    from sgdm.cli.evaluate import eval_config_from_args
    from sgdm.cli.main import build_parser
    from sgdm.config.core import ConfigError

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")

    def config(*flags):
        return eval_config_from_args({}, build_parser("eval").parse_args(["eval", "RUN", *flags]))

    with pytest.raises(ConfigError, match=r"^--inception-weights: only fid, is and kid read .*--metrics fd,adherence,fid"):
        config("--metrics", "fd,adherence", "--inception-weights", str(weights))
    assert config("--metrics", "fd,kid", "--inception-weights", str(weights)).metrics == ["fd", "kid"]
    # the same for the feature extractor's flags without fd
    for flags in (["--feature-extractor", "vit_tiny_patch16_224"], ["--feature-weights", str(weights)]):
        with pytest.raises(ConfigError, match=rf"^{flags[0]}: only fd reads the feature extractor.*--metrics kid,fd"):
            config("--metrics", "kid", *flags)
    assert config("--metrics", "fd", "--feature-weights", str(weights)).metrics == ["fd"]


def test_eval_feature_backbone_kwargs_without_spaces_are_refused():
    from sgdm.config.core import ConfigError, apply_overrides, from_dict
    from sgdm.evaluation.config import EvalConfig

    data = apply_overrides({}, ["feature_backbone_kwargs={img_size:16}"])
    with pytest.raises(ConfigError, match=r"^eval.feature_backbone_kwargs.img_size:16: .*holds a colon"):
        from_dict(EvalConfig, data, "eval")


def test_eval_unknown_feature_extractor_is_one_line(tmp_path, capsys):
    run_dir = make_run(tmp_path, "label")
    assert main(["eval", str(run_dir), "--metrics", "fd", "--feature-extractor", "not_a_timm_net"]) == 1
    err = capsys.readouterr().err
    assert err == "sgdm-ldm eval: unknown backbone 'not_a_timm_net': not a timm model name\n", err


def test_eval_not_a_run_and_bad_sweep(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    run_dir = make_run(tmp_path, "label")
    assert main(["eval", str(run_dir), "--sweep-scale", "0,x"]) == 2
    assert "--sweep-scale: expected comma-separated numbers" in capsys.readouterr().err


def test_eval_unusable_inception_weights_fail_before_sampling(tmp_path, capsys, monkeypatch):
    """A file that exists but is not torch-fidelity's state dict is a one-line error before any
    image is sampled (torch-fidelity itself would load it only after sampling)."""
    import sgdm.evaluation.evaluate as evaluate

    run_dir = make_run(tmp_path, "label")
    sampled = []
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: sampled.append(1) or None)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    for path in (garbage, wrong):
        assert main(["eval", str(run_dir), "--inception-weights", str(path), "--n", "4", "--batch-size", "4",
                     "--steps", "2", "--metrics", "fid"]) == 1
        err = capsys.readouterr().err
        assert f"--inception-weights: {path} is not torch-fidelity's inception-v3-compat state dict" in err, err
        assert "Traceback" not in err
    assert not sampled


class _Items:
    """A dataset whose items listed in ``bad`` cannot be read (``data.on_bad_image: skip`` gives None)."""

    def __init__(self, n, bad):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return None if index in self.bad else {"image": torch.full((3, 2, 2), index / 10.0)}


def test_reference_set_passes_over_unreadable_images():
    """With data.on_bad_image: skip the reference set passes over unreadable images (each replaced by
    the first unpicked readable one), as training left them out, not an error after every sample was drawn."""
    from sgdm.evaluation.evaluate import _ReferenceImages

    ref = _ReferenceImages(_Items(10, bad={1, 4}), 5, uint8=False)
    assert len(ref) == 5
    # items 0, 2, 4, 6, 8 spread over the ten; 4 cannot be read, and 3 (1 cannot either) stands in
    assert [float(ref[i][0, 0, 0]) * 10 for i in range(5)] == pytest.approx([0, 2, 6, 8, 3])
    assert float(ref[1][0, 0, 0]) * 10 == pytest.approx(2)  # random access after the scan
    fresh = _ReferenceImages(_Items(10, bad={1, 4}), 5, uint8=True)
    assert fresh[2].dtype == torch.uint8 and fresh[2][0, 0, 0] == round((0.6 + 1) * 127.5)  # item 6, direct access
    short = _ReferenceImages(_Items(4, bad={0, 2}), 4, uint8=False)
    with pytest.raises(ValueError, match=r"needs 4 readable images \(eval.reference_n\), but only 2 of the dataset's 4"):
        short[0]  # the rows are found all at once, on the first read


def test_reference_set_spreads_over_a_class_ordered_dataset():
    """A dataset stored class by class (ImageNet's sorted folders): reference_n below its size takes
    every class's share, not the first classes whole (50,000 of ImageNet-100's 126,689 were 39 classes)."""
    from sgdm.evaluation.evaluate import _ReferenceImages, reference_candidates

    per_class, classes = 13, 10
    ref = _ReferenceImages(_Items(per_class * classes, bad=()), 50, uint8=False)
    labels = [round(float(ref[i][0, 0, 0]) * 10) // per_class for i in range(len(ref))]
    assert sorted(set(labels)) == list(range(classes)) and max(labels.count(c) for c in range(classes)) == 5
    order = list(reference_candidates(7, 3))
    assert order[:3] == [0, 2, 4] and sorted(order) == list(range(7))
    assert list(reference_candidates(4, 9)) == [0, 1, 2, 3] and list(reference_candidates(0, 5)) == []


def _folder_run(tmp_path, on_bad_image):
    """An unguided run on an image folder of 6 images whose second file is not an image."""
    import numpy as np
    from PIL import Image

    from sgdm.config.core import dump_yaml, from_dict, to_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.features_pretrain.train import build_backbone, save_backbone
    from sgdm.pipeline import SelfGuidedPipeline
    from tests.evaluation.helpers import TINY_VIT, tiny_config

    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(images / f"{i}.png")
    (images / "1.png").write_bytes(b"not a png")
    raw = tiny_config(tmp_path, "none")
    raw["data"] = {"dataset": "image_folder", "root": str(images), "size": 16, "num_workers": 0, "on_bad_image": on_bad_image}
    raw["eval"].update(metrics=["fd"], reference_n=4, n=4, batch_size=4)
    cfg = from_dict(ExperimentConfig, raw)
    run_dir = cfg.run.path
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_backbone(build_backbone("vit_tiny_patch16_224", TINY_VIT), cfg.annotation.weights, "vit_tiny_patch16_224", TINY_VIT)
        SelfGuidedPipeline.from_config(to_dict(cfg)).save_pretrained(run_dir / "pipeline")
    return run_dir


def test_eval_of_a_run_with_unreadable_training_images(tmp_path):
    """data.on_bad_image: skip trains without the unreadable files; eval must not stop on them."""
    run_dir = _folder_run(tmp_path, "skip")
    assert main(["eval", str(run_dir)]) == 0
    (row,) = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    assert row["fd_tiny"] > 0


def test_sweep_row_equals_the_evaluation_at_that_scale_alone(tmp_path):
    """The samples of w are the same in a sweep and alone; so must their scores be (the segmenter
    fitted on the samples of a ground-truth-mask run draws its k-means start from eval.seed)."""
    run_dir = make_run(tmp_path, "mask")
    assert main(["eval", str(run_dir), "--metrics", "adherence", "--sweep-scale", "1,2"]) == 0
    swept = json.loads((run_dir / "eval" / "results.json").read_text())["results"][1]
    assert main(["eval", str(run_dir), "--metrics", "adherence", "--guidance-scale", "2"]) == 0
    (alone,) = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    assert swept == alone


def _results(scales):
    return {"run": "r", "guidance": "label", "n": 2, "sampler": "ddim", "steps": 2, "eta": 0.0,
            "results": [{"guidance_scale": s, "fd_tiny": 1.0 + s} for s in scales]}


def test_results_of_one_scale_remove_an_earlier_sweep_plot(tmp_path):
    from sgdm.evaluation.evaluate import write_results

    write_results(_results([0.0, 2.0]), tmp_path, plot=True)
    assert (tmp_path / "sweep.png").stat().st_size > 0
    write_results(_results([2.0]), tmp_path, plot=False)
    assert not (tmp_path / "sweep.png").exists()  # it showed the earlier sweep, not these results
    assert json.loads((tmp_path / "results.json").read_text())["results"] == [{"guidance_scale": 2.0, "fd_tiny": 3.0}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


def test_interrupted_results_write_keeps_the_earlier_files_whole(tmp_path, monkeypatch):
    import os

    import sgdm.training.checkpoint as checkpoint
    from sgdm.evaluation.evaluate import write_results

    write_results(_results([1.0]), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_results(_results([3.0, 4.0]), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no half-written file, no temporary
    assert os.path.exists(tmp_path / "results.json")


def test_results_name_the_reference_set_size_actually_used(tmp_path):
    """eval.reference_n larger than the dataset is capped; results.json says by how much (the
    Frechet distance depends on the reference size; eval_config keeps the value asked for)."""
    import dataclasses

    from sgdm.config.schema import load_experiment
    from sgdm.evaluation.evaluate import evaluate_run

    run_dir = make_run(tmp_path, "label")  # 12 training images
    ecfg = load_experiment(run_dir / "config.yaml").eval
    results = evaluate_run(run_dir, dataclasses.replace(ecfg, metrics=["fd"], reference_n=50), log=lambda msg: None)
    assert results == json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["reference_images"] == 12 and results["eval_config"]["reference_n"] == 50
    assert "reference set: the first 12 training images" in (run_dir / "eval" / "results.md").read_text()
    box_run = make_run(tmp_path / "box", "box")
    unreferenced = evaluate_run(box_run, dataclasses.replace(ecfg, metrics=["adherence"]), log=lambda msg: None)
    assert unreferenced["reference_images"] is None  # layout adherence needs no reference set


def test_unreadable_reference_image_stops_eval_before_sampling(tmp_path, capsys, monkeypatch):
    """data.on_bad_image: raise: the reference set is read before the samples are drawn, so an
    unreadable file is named at once, not after hours of sampling."""
    import sgdm.evaluation.evaluate as evaluate

    run_dir = _folder_run(tmp_path, "raise")
    sampled = []
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: sampled.append(1) or None)
    assert main(["eval", str(run_dir)]) != 0
    assert "1.png" in capsys.readouterr().err
    assert not sampled


def test_markdown_table_escapes_what_would_break_a_row():
    from sgdm.evaluation.evaluate import markdown_table

    table = markdown_table([{"run": "a|b\\", "note": "two\nlines", "x": 0.123456, "y": None}])
    assert table.splitlines()[2] == "| a\\|b\\\\ | two lines | 0.1235 | - |"
    assert table.splitlines()[0] == "| run | note | x | y |"


def test_eval_fd_without_annotation_weights_offline_names_the_eval_flags(tmp_path, capsys, monkeypatch):
    """The distance's extractor defaults to the run's annotation backbone; when that cannot be loaded, the
    error named only annotation.weights, not eval's own --feature-extractor / --feature-weights or --metrics."""
    import sgdm.annotation.features as features
    import yaml

    monkeypatch.setattr(features, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(features, "cached_pretrained_file", lambda name: None)
    run_dir = make_run(tmp_path, "label")
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw["annotation"]["weights"] = None
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    assert main(["eval", str(run_dir), "--metrics", "fd"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sgdm-ldm eval: fd: backbone 'vit_tiny_patch16_224': no local weights given") and \
        err.count("\n") == 1, err
    assert "--feature-extractor NAME --feature-weights FILE (eval.feature_backbone, eval.feature_weights)" in err
    assert "leave fd out of --metrics (eval.metrics)" in err


@pytest.mark.parametrize("kind, message", [
    ("label", "adherence alone of a label run measures nothing here: the annotation store"),
    ("none", "adherence scores guided runs; this run has no guidance"),
])
def test_eval_adherence_alone_that_would_measure_nothing_is_refused(tmp_path, capsys, kind, message):
    """A run evaluated for adherence alone where there is nothing to score (no guidance, or a label store
    without its centroids) sampled every image and wrote a results table without a metric, exit 0."""
    run_dir = make_run(tmp_path, kind)
    assert main(["eval", str(run_dir), "--metrics", "adherence"]) == 2
    assert f"config error: eval.metrics: {message}" in capsys.readouterr().err
    assert not (run_dir / "eval" / "results.json").exists()


def test_reference_n_flag_sets_eval_reference_n_and_a_bad_value_names_the_flag():
    import argparse

    from sgdm.cli.evaluate import add_parser, eval_config_from_args
    from sgdm.config.core import ConfigError

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    assert eval_config_from_args({"reference_n": 500}, parser.parse_args(["run", "--reference-n", "40"])).reference_n == 40
    with pytest.raises(ConfigError, match=r"--reference-n \(eval\.reference_n\)"):
        eval_config_from_args({}, parser.parse_args(["run", "--reference-n", "1"]))
