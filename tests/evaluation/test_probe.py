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
    # a class predicted where the truth has none counts as 0: class 2 on class-1 pixels
    out = class_iou(torch.tensor([[0, 2]]), torch.tensor([[0, 1]]), 3)
    assert out == {"miou": pytest.approx(1 / 3), "pixel_accuracy": pytest.approx(0.5)}
    # classes neither present nor predicted are left out
    out = class_iou(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]), 3)
    assert out == {"miou": 1.0, "pixel_accuracy": 1.0}


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
    # at most max_images of them, a subset drawn from the generator, in store order
    picks = {tuple(real_probe_data(Data(), store, 1, torch.Generator().manual_seed(s))[1][:, 0, 0].tolist())
             for s in range(8)}
    assert picks == {(2,), (0,)}
    images, got = real_probe_data(Data(), store, 5, torch.Generator().manual_seed(0))  # more than there are: all
    assert got[:, 0, 0].tolist() == [2, 0]
    with pytest.raises(ValueError, match="max_images needs a generator"):
        real_probe_data(Data(), store, 1)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_probe_max_images_is_checked(bad):
    from sgdm.config.core import ConfigError

    with pytest.raises(ConfigError, match="max_images"):
        ProbeConfig(max_images=bad).validate()


def _gt_store(run_dir):
    """Rewrite the tiny mask run's store as ground truth (class 1 on the right half, 2 on the top-left), and
    the run as one guided by it (model.guidance.source and annotation.source gt: evaluation refuses a store
    of another source than the run's)."""
    import yaml

    from sgdm.annotation.store import AnnotationStore, write_store
    from sgdm.config.schema import load_experiment

    cfg = load_experiment(run_dir / "config.yaml")
    old = AnnotationStore.open(cfg.annotation.store)
    masks = old.tensor("mask").clone()
    masks[:, :4, :4] = 2
    write_store(cfg.annotation.store, old.ids, {"mask": masks}, granularity="mask", num_classes=3,
                extra={"source": "gt"})
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["guidance"]["source"] = config["annotation"]["source"] = "gt"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


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
        assert 0 <= row["mask_probe_recon_miou"] <= 1  # the real images through the run's autoencoder
        assert "mask_miou" in row  # the unsupervised score is still reported
    assert rows[0]["mask_probe_real_miou"] == rows[1]["mask_probe_real_miou"]


def test_eval_self_mask_run_keeps_the_segmenter_score_only(tmp_path):
    from sgdm.cli.main import main
    from tests.evaluation.helpers import make_run

    run_dir = make_run(tmp_path, "mask")
    assert main(["eval", str(run_dir), "--metrics", "adherence", "--guidance-scale", "1"]) == 0
    (row,) = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    assert "mask_miou" in row and not any("probe" in k for k in row)


def toy_images(num_classes=3, n=48, seed=0):
    """Images [n, 3, 8, 8] whose 4x4 quadrants are flat colours, one per class, and their masks [n, 8, 8]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n, 2, 2), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    palette = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0]])[:num_classes]
    images = palette[labels].permute(0, 3, 1, 2) + 0.05 * torch.randn(n, 3, 8, 8, generator=g)
    masks = labels.to(torch.uint8)
    masks[:, 0, 0] = 255
    return images, masks




def _pixels_config():
    from sgdm.config.core import from_dict
    from sgdm.evaluation.config import ProbeConfig as Config

    return from_dict(Config, {"input": "pixels", "segmenter": {"width": 4, "epochs": 15, "batch_size": 16, "lr": 0.02}},
                     "eval.probe")


def test_pixel_segmenter_learns_the_layout_from_the_images_and_is_reproducible():
    images, masks = toy_images()
    cfg = _pixels_config()
    seg, real = fit_with_held_out(images, masks, 3, torch.Generator().manual_seed(0), cfg)
    assert seg.input == "pixels" and seg.num_classes == 3
    assert real["miou"] > 0.9
    assert seg.predict(images, (8, 8)).shape == (48, 8, 8)
    assert seg.predict(images, (6, 6)).shape == (48, 6, 6)  # any mask size: the net works at a multiple of 4
    again, _ = fit_with_held_out(images, masks, 3, torch.Generator().manual_seed(0), cfg)
    assert torch.equal(seg.predict(images, (8, 8)), again.predict(images, (8, 8)))
    # shuffled labels: nothing to learn from the pixels
    g = torch.Generator().manual_seed(1)
    _, chance = fit_with_held_out(images, masks[torch.randperm(48, generator=g)], 3, g, cfg)
    assert chance["miou"] < 0.6


def test_pixel_segmenter_bad_input_is_named():
    from sgdm.evaluation.segmenter import fit_segmenter

    images, masks = toy_images()
    cfg = _pixels_config()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"images: expected \[N, 3, H, W\]"):
        fit_with_held_out(images[:, :2], masks, 3, g, cfg)
    with pytest.raises(ValueError, match=r"masks: expected \[48, h, w\]"):
        fit_with_held_out(images, masks[:5], 3, g, cfg)
    with pytest.raises(ValueError, match=r"masks: class ids must lie in \[0, 2\)"):
        fit_segmenter(images, masks, 2, g, cfg.segmenter)
    with pytest.raises(ValueError, match="every pixel is 255"):
        fit_segmenter(images, torch.full_like(masks, 255), 3, g, cfg.segmenter)


@pytest.mark.parametrize("entry,key", [({"input": "rgb"}, "input"), ({"segmenter": {"width": 0}}, "segmenter.width"),
                                       ({"segmenter": {"epochs": 0}}, "segmenter.epochs"),
                                       ({"segmenter": {"lr": 0.0}}, "segmenter.lr")])
def test_eval_pixel_segmenter_config_names_the_bad_key(entry, key):
    from sgdm.config.core import ConfigError, from_dict
    from sgdm.evaluation.config import EvalConfig

    with pytest.raises(ConfigError, match=rf"eval\.probe\.{key}"):
        from_dict(EvalConfig, {"probe": entry}, "eval")


def test_eval_gt_mask_run_can_score_samples_with_the_pixel_segmenter(tmp_path, monkeypatch):
    import yaml

    import sgdm.evaluation.segmenter as segmenter_module
    from sgdm.cli.main import main
    from tests.evaluation.helpers import make_run

    fits = []
    real = segmenter_module.fit_segmenter
    monkeypatch.setattr(segmenter_module, "fit_segmenter", lambda *a, **k: fits.append(a[0].shape) or real(*a, **k))

    run_dir = make_run(tmp_path, "mask")
    _gt_store(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config.setdefault("eval", {})["probe"] = {"input": "pixels", "held_out": 0.25,
                                              "segmenter": {"width": 4, "epochs": 2, "batch_size": 8}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", str(run_dir), "--metrics", "adherence", "--guidance-scale", "1"]) == 0
    assert len(fits) == 1 and fits[0][1] == 3  # trained once, on images (not tokens)
    row = json.loads((run_dir / "eval" / "results.json").read_text())["results"][0]
    for key in ("mask_miou_probe", "mask_pixel_accuracy_probe", "mask_probe_real_miou", "mask_probe_recon_miou",
                "mask_miou_probe_mismatched"):
        assert 0 <= row[key] <= 1, key


def test_held_out_views_are_scored_by_the_same_probe():
    tokens, masks = toy()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(tokens.shape, generator=g)
    _, scores = fit_with_held_out(tokens, masks, 4, torch.Generator().manual_seed(0), FAST,
                                  views={"same": lambda rows: tokens[rows].clone(), "noise": lambda rows: noise[rows]})
    assert scores["same_miou"] == scores["miou"] and scores["same_pixel_accuracy"] == scores["pixel_accuracy"]
    assert scores["noise_miou"] < 0.5 < scores["miou"]
    with pytest.raises(ValueError, match=r"views\['bad'\]: expected the shape of inputs"):
        fit_with_held_out(tokens, masks, 4, g, FAST, views={"bad": lambda rows: tokens[:3]})


def test_pixel_segmenter_initialisation_leaves_the_global_generators_alone(monkeypatch):
    """Its initial weights come from the caller's generator; torch.manual_seed inside fork_rng(devices=[])
    reseeded every CUDA device's default generator and left it so."""
    from sgdm.evaluation.config import SegmenterConfig
    from sgdm.evaluation.segmenter import fit_segmenter

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    images, masks = toy_images()
    before = torch.random.get_rng_state()
    fit_segmenter(images[:4], masks[:4], 3, torch.Generator().manual_seed(0), SegmenterConfig(epochs=1, width=4))
    assert calls == [] and torch.equal(torch.random.get_rng_state(), before)
