"""Evaluation measures a run against the annotations it was trained on and the f that made them: the
store's kind, K and content, the extractor's input size and the settings of f that adherence reads are
compared with the run before any sampling, and a difference is a config error naming the key and both
values."""
import json

import pytest
import torch

from sgdm.cli.main import main
from tests.evaluation.helpers import make_run, record_annotation

# TINY_VIT without img_size: the input size comes from annotation.image_size alone
SIZELESS_VIT = dict(patch_size=4, depth=1, embed_dim=32, num_heads=2)


@pytest.fixture
def no_sampling(monkeypatch):
    """Fails the test if the evaluation reaches sampling."""
    import sgdm.evaluation.evaluate as evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("the evaluation sampled before refusing the store")

    monkeypatch.setattr(evaluate, "generate", refuse)


def _refused(run_dir, capsys, *flags) -> str:
    assert main(["eval", str(run_dir), *flags]) == 2  # a config error
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def test_adherence_extractor_is_built_at_the_annotation_image_size(tmp_path, monkeypatch):
    # annotate builds its extractor with annotation.image_size (16 here; the backbone's own is 224):
    # the samples must be resized to it, or LOST runs on another patch grid than the store's boxes
    import sgdm.evaluation.adherence as adherence

    run_dir = make_run(tmp_path, "box", annotation={"backbone_kwargs": SIZELESS_VIT, "image_size": 16})
    seen = {}

    def spy(space, images, boxes, *args, **kwargs):
        seen["input_size"] = space.backbone.input_size
        return {"box_iou": 0.0, "box_hit50": 0.0}

    monkeypatch.setattr(adherence, "box_adherence", spy)
    assert main(["eval", str(run_dir), "--metrics", "adherence", "--n", "3"]) == 0
    assert seen["input_size"] == (16, 16)


def test_fd_on_the_annotation_backbone_takes_the_annotation_image_size(tmp_path):
    # fd's default space is the annotation's extractor (the one adherence reuses), and other weights for the
    # annotation's architecture (--feature-weights alone) are built at its input size too
    import dataclasses

    from sgdm.config.schema import load_recorded
    from sgdm.evaluation.evaluate import _feature_space, recorded_eval

    run_dir = make_run(tmp_path, "box", annotation={"backbone_kwargs": SIZELESS_VIT, "image_size": 16})
    cfg, ecfg = load_recorded(run_dir / "config.yaml"), recorded_eval(run_dir)
    assert _feature_space(cfg, ecfg).backbone.input_size == (16, 16)
    own = dataclasses.replace(ecfg, feature_weights=cfg.annotation.weights)
    assert _feature_space(cfg, own).backbone.input_size == (16, 16)


def test_store_made_at_another_input_size_stops_before_sampling(tmp_path, capsys, no_sampling):
    run_dir = make_run(tmp_path, "box")
    record_annotation(run_dir, extractor={"input_size": [32, 32]})
    err = _refused(run_dir, capsys, "--metrics", "adherence")
    assert "annotation.image_size" in err and "16x16 px" in err and "32x32 px" in err, err


@pytest.mark.parametrize("kind, params, key, values", [
    ("mask", {"stego": {"mask_size": 16}}, "annotation.stego.mask_size", "the run has 64, the store 16"),
    ("mask", {"stego": {"crf": {"enabled": True}}}, "annotation.stego.crf.enabled", "the run has False, the store True"),
    ("mask", {"stego": {"method": "stego"}}, "annotation.stego.method", "the run has 'kmeans', the store 'stego'"),
    ("mask", {"kmeans": {"max_iter": 7}}, "annotation.kmeans.max_iter", "the run has 100, the store 7"),
    ("mask", {"image_size": 32}, "annotation.image_size", "the run has 0, the store 32"),
    ("box", {"lost": {"k_patches": 2}}, "annotation.lost.k_patches", "the run has 4, the store 2"),
    ("box", {"lost": {"center": True}}, "annotation.lost.center", "the run has False, the store True"),
])
def test_adherence_with_other_settings_of_f_than_the_store_stops_before_sampling(tmp_path, capsys, no_sampling,
                                                                                 kind, params, key, values):
    run_dir = make_run(tmp_path, kind)
    record_annotation(run_dir, params=params)
    err = _refused(run_dir, capsys, "--metrics", "adherence")
    assert f"{key}: {values}" in err and "manifest.json" in err and "--metrics" in err, err


def test_settings_adherence_does_not_read_may_differ(tmp_path):
    from sgdm.annotation.store import AnnotationStore
    from sgdm.config.schema import load_recorded
    from sgdm.evaluation.store_checks import check_adherence_settings, check_store

    for kind, params in [("mask", {"batch_size": 7, "device": "cpu", "kmeans": {"chunk_elements": 5}}),
                         ("box", {"stego": {"mask_size": 8}, "kmeans": {"max_iter": 3}}),
                         ("label", {"stego": {"mask_size": 8}, "lost": {"k_patches": 1}})]:
        run_dir = make_run(tmp_path / kind, kind)
        record_annotation(run_dir, params=params)
        cfg = load_recorded(run_dir / "config.yaml")
        check_store(cfg, ["adherence", "fd"], run_dir)
        check_adherence_settings(cfg, AnnotationStore.open(cfg.annotation.store), run_dir)


def _keep_segmenter(run_dir, num_classes=3):
    """Save a patch-k-means f of ``num_classes`` classes into the run's mask store, as annotate does."""
    from sgdm.annotation.stego import Segmenter
    from sgdm.config.schema import load_recorded

    store = load_recorded(run_dir / "config.yaml").annotation.store
    Segmenter(torch.randn(num_classes, 32, generator=torch.Generator().manual_seed(0))).save(store / "segmenter.safetensors")
    return "segmenter.safetensors"


def test_with_the_store_own_segmenter_only_its_grid_and_crf_must_match(tmp_path):
    from sgdm.annotation.store import AnnotationStore
    from sgdm.config.core import ConfigError
    from sgdm.config.schema import load_recorded
    from sgdm.evaluation.store_checks import check_adherence_settings

    run_dir = make_run(tmp_path, "mask")
    cfg = load_recorded(run_dir / "config.yaml")
    name = _keep_segmenter(run_dir)
    # how f was trained is the file's business: only the maps it draws are the run's settings
    record_annotation(run_dir, params={"stego": {"epochs": 3, "method": "stego"}, "kmeans": {"max_iter": 7}},
                      segmenter=name)
    check_adherence_settings(cfg, AnnotationStore.open(cfg.annotation.store), run_dir)
    record_annotation(run_dir, params={"stego": {"mask_size": 16}}, segmenter=name)
    with pytest.raises(ConfigError, match=r"own f.*annotation.stego.mask_size: the run has 64, the store 16"):
        check_adherence_settings(cfg, AnnotationStore.open(cfg.annotation.store), run_dir)


def test_a_segmenter_of_another_k_than_its_store_is_refused(tmp_path):
    from sgdm.annotation.store import AnnotationStore
    from sgdm.config.schema import load_recorded
    from sgdm.evaluation.store_checks import check_adherence_settings

    run_dir = make_run(tmp_path, "mask")
    cfg = load_recorded(run_dir / "config.yaml")
    record_annotation(run_dir, segmenter=_keep_segmenter(run_dir, num_classes=2))
    with pytest.raises(ValueError, match="has 2 classes, its manifest K=3"):
        check_adherence_settings(cfg, AnnotationStore.open(cfg.annotation.store), run_dir)


def test_store_annotated_again_since_training_stops_before_sampling(tmp_path, capsys, no_sampling):
    # training records the store's content digest at every start (annotation_store.json); conditions
    # drawn from another store's content are guidance the model never saw, whatever the metric
    from sgdm.annotation.store import AnnotationStore
    from sgdm.config.schema import load_recorded
    from sgdm.evaluation.store_checks import check_store

    run_dir = make_run(tmp_path, "label")
    cfg = load_recorded(run_dir / "config.yaml")
    (run_dir / "annotation_store.json").write_text(json.dumps({"store": str(cfg.annotation.store), "sha256": "0" * 64}))
    err = _refused(run_dir, capsys, "--metrics", "fd")
    assert "annotation.store" in err and "never saw" in err and "annotation_store.json" in err, err
    digest = AnnotationStore.open(cfg.annotation.store).content_digest()
    (run_dir / "annotation_store.json").write_text(json.dumps({"store": str(cfg.annotation.store), "sha256": digest}))
    check_store(cfg, ["fd"], run_dir)  # the store the run was trained on


@pytest.mark.parametrize("manifest, key", [
    ({"num_classes": 4}, "model.guidance.num_classes"),
    ({"source": "gt"}, "model.guidance.source"),
])
def test_store_that_does_not_match_the_run_guidance_stops_before_sampling(tmp_path, capsys, no_sampling,
                                                                          manifest, key):
    run_dir = make_run(tmp_path, "label")
    record_annotation(run_dir, **manifest)
    err = _refused(run_dir, capsys, "--metrics", "fd")
    assert key in err, err
