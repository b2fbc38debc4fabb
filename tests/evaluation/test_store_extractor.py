"""Adherence scores the samples with the run's annotation extractor: one that is not the extractor the
annotation store was made with (its manifest's ``extractor``) stops the evaluation before sampling."""
import pytest

from sgdm.cli.main import main
from tests.evaluation.helpers import TINY_VIT, make_run, record_annotation


def _record_extractor(run_dir, **changes):
    return record_annotation(run_dir, extractor=changes)


@pytest.mark.parametrize("changes, key, shown", [
    ({"backbone_kwargs": {**TINY_VIT, "depth": 2}}, "annotation.backbone_kwargs", "'depth': 2"),
    ({"weights_sha256": "ab" * 32, "weights": "/elsewhere/enc.safetensors"}, "annotation.weights",
     "/elsewhere/enc.safetensors (sha256 abababababab"),
    ({"backbone": "vit_small_patch16_224.dino"}, "annotation.backbone", "'vit_small_patch16_224.dino'"),
])
def test_adherence_with_another_extractor_than_the_store_stops_before_sampling(tmp_path, monkeypatch, capsys,
                                                                               changes, key, shown):
    import sgdm.evaluation.evaluate as evaluate

    run_dir = make_run(tmp_path, "box")
    _record_extractor(run_dir, **changes)
    sampled = []
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: sampled.append(1) or None)
    assert main(["eval", str(run_dir), "--metrics", "adherence"]) == 2  # a config error
    err = capsys.readouterr().err
    assert f"{key}: the run has " in err and shown in err, err
    assert "manifest.json" in err and "--metrics" in err and "Traceback" not in err, err
    assert not sampled


def test_the_store_extractor_is_checked_only_for_adherence_and_passes_when_it_matches(tmp_path):
    from sgdm.config.schema import load_recorded
    from sgdm.evaluation.evaluate import check_store_extractor, recorded_eval

    run_dir = make_run(tmp_path, "box")
    cfg, ecfg = load_recorded(run_dir / "config.yaml"), recorded_eval(run_dir)
    _record_extractor(run_dir)
    check_store_extractor(cfg, ecfg.metrics, run_dir)  # the store's own extractor
    _record_extractor(run_dir, backbone_kwargs={**TINY_VIT, "depth": 2})
    check_store_extractor(cfg, ["fd"], run_dir)  # fd measures in whichever space it is given
    with pytest.raises(ValueError, match="annotation.backbone_kwargs"):
        check_store_extractor(cfg, ["adherence"], run_dir)
