"""The supervised linear probe that scores ground-truth-mask adherence, and its evaluator path."""
import json
import pytest
import torch

from sgdm.evaluation.probe import ProbeConfig, class_iou, fit_probe, fit_with_held_out, real_probe_data

FAST = ProbeConfig(epochs=20, batch_size=32, lr=0.05)


def toy(num_classes=4, n=80, separable=True, seed=0):
    """Patch tokens [n, 4, 4, 8] and masks [n, 8, 8] (regions of 2x2 patches, each patch 2x2 pixels):
    with ``separable`` the token holds the one-hot of its class (plus noise), else pure noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n, 2, 2), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    noise = 0.3 * torch.randn(n, 4, 4, 8, generator=g)
    tokens = noise + (torch.nn.functional.pad(torch.eye(num_classes), (0, 8 - num_classes))[labels] if separable else 0)
    masks = labels.repeat_interleave(2, 1).repeat_interleave(2, 2).to(torch.uint8)
    masks[:, 0, 0] = 255  # ignored pixels must not count
    return tokens, masks


def test_probe_learns_a_separable_problem_and_not_a_random_one():
    tokens, masks = toy()
    probe, real = fit_with_held_out(tokens, masks, 4, torch.Generator().manual_seed(0), FAST)
    assert real["miou"] > 0.9 and real["pixel_accuracy"] > 0.95
    assert probe.predict(tokens, (8, 8)).shape == (80, 8, 8)
    noise, _ = toy(separable=False)
    _, chance = fit_with_held_out(noise, masks, 4, torch.Generator().manual_seed(0), FAST)
    assert chance["miou"] < 0.4  # 4 balanced classes: chance IoU ~ 1/7


def test_probe_is_reproducible_from_its_generator():
    tokens, masks = toy(separable=False)
    a = fit_probe(tokens, masks, 4, torch.Generator().manual_seed(3), FAST)
    b = fit_probe(tokens, masks, 4, torch.Generator().manual_seed(3), FAST)
    c = fit_probe(tokens, masks, 4, torch.Generator().manual_seed(4), FAST)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)


def test_class_iou_compares_ids_as_they_are():
    true = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    assert class_iou(true.clamp_max(2), true, 3) == {"miou": 1.0, "pixel_accuracy": 1.0}
    swapped = torch.tensor([[1, 1, 0, 0], [2, 2, 0, 0]])  # Hungarian matching would call this perfect
    out = class_iou(swapped, true, 3)
    assert out["miou"] == pytest.approx(1 / 3) and out["pixel_accuracy"] == pytest.approx(2 / 6)
    # classes absent from the truth do not count: class 2 predicted on class-1 pixels
    out = class_iou(torch.tensor([[0, 2]]), torch.tensor([[0, 1]]), 3)
    assert out == {"miou": pytest.approx(0.5), "pixel_accuracy": pytest.approx(0.5)}


def test_probe_bad_input_is_named():
    tokens, masks = toy()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"masks: expected \[80, h, w\]"):
        fit_probe(tokens, masks[:3], 4, g, FAST)
    with pytest.raises(ValueError, match=r"masks: expected \[80, h, w\]"):
        fit_probe(tokens, masks[:, 0], 4, g, FAST)
    with pytest.raises(ValueError, match=r"masks: class ids must lie in \[0, 3\)"):
        fit_probe(tokens, masks, 3, g, FAST)
    with pytest.raises(ValueError, match="every pixel is 255"):
        fit_probe(tokens, torch.full_like(masks, 255), 4, g, FAST)
    with pytest.raises(ValueError, match=r"patches: expected \[N, h', w', 8\]"):
        fit_probe(tokens, masks, 4, g, FAST).predict(tokens[..., :5], (8, 8))


@pytest.mark.parametrize("key,value", [("held_out", 1.0), ("held_out", 0.0), ("epochs", 0), ("batch_size", 0),
                                       ("lr", 0.0), ("weight_decay", -1.0)])
def test_eval_probe_config_names_the_bad_key(key, value):
    from sgdm.config.core import ConfigError, from_dict
    from sgdm.evaluation.config import EvalConfig

    with pytest.raises(ConfigError, match=rf"eval\.probe\.{key}"):
        from_dict(EvalConfig, {"probe": {key: value}}, "eval")
    assert from_dict(EvalConfig, {"probe": {"epochs": 3}}, "eval").probe.epochs == 3


def test_real_probe_data_joins_store_ids_to_dataset_items(tmp_path):
    from sgdm.annotation.store import write_store

    class Data:  # a dataset stand-in: ids and items whose image encodes the index
        ids = ["a", "b", "c"]

        def __getitem__(self, i):
            return {"image": torch.full((3, 4, 4), float(i))}

    masks = torch.arange(3).view(3, 1, 1).expand(3, 4, 4).to(torch.uint8)
    store = write_store(tmp_path / "s", ["c", "a"], {"mask": masks[[2, 0]]}, granularity="mask", num_classes=3,
                        extra={"source": "gt"})
    images, got = real_probe_data(Data(), store)
    assert images[:, 0, 0, 0].tolist() == [2.0, 0.0] and got[:, 0, 0].tolist() == [2, 0]
    foreign = write_store(tmp_path / "f", ["x", "y"], {"mask": masks[:2]}, granularity="mask", num_classes=3)
    with pytest.raises(ValueError, match=r"none of its 2 image ids \(e.g. 'x', 'y'\) is an image of the dataset"):
        real_probe_data(Data(), foreign)


def _gt_store(run_dir):
    """Rewrite the tiny mask run's store as ground truth: class 1 on the right half, 2 on the top-left."""
    from sgdm.annotation.store import AnnotationStore, write_store
    from sgdm.config.schema import load_experiment

    cfg = load_experiment(run_dir / "config.yaml")
    old = AnnotationStore.open(cfg.annotation.store)
    masks = old.tensor("mask").clone()
    masks[:, :4, :4] = 2
    write_store(cfg.annotation.store, old.ids, {"mask": masks}, granularity="mask", num_classes=3,
                extra={"source": "gt"})


def test_eval_gt_mask_run_scores_samples_with_the_probe(tmp_path, monkeypatch):
    import sgdm.evaluation.probe as probe_module
    from sgdm.cli.main import main
    from tests.evaluation.helpers import make_run

    run_dir = make_run(tmp_path, "mask")
    _gt_store(run_dir)
    fits = []
    real = probe_module.fit_with_held_out
    monkeypatch.setattr(probe_module, "fit_with_held_out", lambda *a, **k: fits.append(1) or real(*a, **k))
    assert main(["eval", str(run_dir), "--metrics", "adherence", "--sweep-scale", "1,2"]) == 0
    rows = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    assert len(fits) == 1  # one probe for the whole sweep
    for row in rows:
        assert 0 <= row["mask_miou_probe"] <= 1 and 0 <= row["mask_pixel_accuracy_probe"] <= 1
        assert 0 <= row["mask_probe_real_miou"] <= 1 and 0 <= row["mask_miou_probe_mismatched"] <= 1
        assert "mask_miou" in row  # the unsupervised score is still reported
    assert rows[0]["mask_probe_real_miou"] == rows[1]["mask_probe_real_miou"]


def test_eval_self_mask_run_keeps_the_segmenter_score_only(tmp_path):
    from sgdm.cli.main import main
    from tests.evaluation.helpers import make_run

    run_dir = make_run(tmp_path, "mask")
    assert main(["eval", str(run_dir), "--metrics", "adherence", "--guidance-scale", "1"]) == 0
    (row,) = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    assert "mask_miou" in row and not any("probe" in k for k in row)
