"""fd_<name> in a local feature space and layout adherence plumbing (tiny random ViT)."""
import pytest
import torch

from sgdm.annotation.config import KMeansConfig, LostConfig, StegoConfig
from sgdm.evaluation.adherence import box_adherence, mask_adherence
from sgdm.evaluation.feature_distance import feature_distance, load_feature_space, reference_stats
from sgdm.features_pretrain.train import build_backbone, save_backbone

TINY_VIT = dict(img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    torch.manual_seed(0)  # timm init uses the global RNG; only this fixture's weights depend on it
    path = save_backbone(build_backbone("vit_tiny_patch16_224", TINY_VIT), tmp_path_factory.mktemp("fd") / "enc.safetensors", "vit_tiny_patch16_224", TINY_VIT)
    return load_feature_space("vit_tiny_patch16_224", path, TINY_VIT, name="tiny")


def test_feature_distance_is_named_zero_on_same_set_and_cached(space, tmp_path, generator):
    images = torch.rand(24, 3, 16, 16, generator=generator) * 2 - 1
    cache = tmp_path / "ref.pt"
    ref = reference_stats(space, images.split(8), cache)
    assert cache.is_file()
    same = feature_distance(space, images, ref, batch_size=8)
    assert list(same) == ["fd_tiny"] and same["fd_tiny"] == pytest.approx(0.0, abs=1e-6)
    shifted = feature_distance(space, (images * 0.2).clamp(-1, 1), ref)
    assert shifted["fd_tiny"] > 1e-3
    cached = reference_stats(space, [], cache)  # no images needed the second time
    assert torch.equal(cached.mu, ref.mu)


def test_default_name_is_never_fid(tmp_path):
    from sgdm.evaluation.feature_distance import _default_name

    assert _default_name("vit_small_patch16_224.dino") == "dino"
    assert _default_name("resnet50.a1_in1k") == "resnet50"


def test_missing_feature_weights_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="feature extractor weights: file .*missing.pth does not exist"):
        load_feature_space("vit_tiny_patch16_224", tmp_path / "missing.pth", TINY_VIT)


def test_feature_weights_of_another_shape_are_one_line(tmp_path):
    """eval's --feature-weights goes through the annotation loader: a shape mismatch is one BackboneError."""
    from sgdm.annotation.features import BackboneError

    with torch.random.fork_rng(devices=[]):  # timm initialises from the global RNG
        path = save_backbone(build_backbone("vit_tiny_patch16_224", TINY_VIT), tmp_path / "enc.safetensors",
                             "vit_tiny_patch16_224", TINY_VIT)
    with pytest.raises(BackboneError, match=r"enc.safetensors does not match backbone vit_tiny_patch16_224: "
                                            r"'cls_token' has shape \(1, 1, 32\) in the file, \(1, 1, 48\) in the model"):
        load_feature_space("vit_tiny_patch16_224", path, {**TINY_VIT, "embed_dim": 48})


def test_box_adherence_plumbing(space, generator):
    images = torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    out = box_adherence(space, images, boxes, LostConfig(k_patches=4))
    assert set(out) == {"box_iou", "box_hit50"}
    assert 0 < out["box_iou"] <= 1 and 0 <= out["box_hit50"] <= 1
    with pytest.raises(ValueError, match=r"boxes: expected \[3, 4\]"):
        box_adherence(space, images, boxes[:2])


@pytest.mark.parametrize("features,center", [("keys", False), ("tokens", True)])
def test_box_adherence_runs_the_annotation_lost(space, generator, features, center):
    # samples that reproduce their guiding layout exactly: the boxes LOST found on the
    # same images with the same settings give IoU 1, whichever settings those are
    from sgdm.annotation.lost import lost_boxes

    cfg = LostConfig(k_patches=3, features=features, center=center)
    images = torch.rand(6, 3, 16, 16, generator=generator) * 2 - 1
    boxes = lost_boxes(space.backbone, images, cfg)
    out = box_adherence(space, images, boxes, cfg, batch_size=4)
    assert out == {"box_iou": pytest.approx(1.0), "box_hit50": 1.0}


def test_mask_adherence_plumbing(space, generator):
    images = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    masks = torch.zeros(4, 8, 8, dtype=torch.uint8)
    masks[:, :, 4:] = 1
    masks[0, 0, 0] = 255
    out = mask_adherence(space, images, masks, 2, StegoConfig(method="kmeans"), KMeansConfig(max_iter=5), generator)
    assert 0 <= out["mask_miou"] <= 1 and 0 <= out["mask_pixel_accuracy"] <= 1
    assert out["mask_matching"] == "hungarian"  # a segmenter fitted on the samples: its ids are arbitrary
    with pytest.raises(ValueError, match=r"masks: expected \[4, h, w\]"):
        mask_adherence(space, images, masks[:2], 2, StegoConfig(method="kmeans"), KMeansConfig(), generator)


@pytest.mark.parametrize("method", ["kmeans", "stego"])
def test_mask_adherence_applies_the_stored_segmenter(space, generator, tmp_path, method):
    # samples that reproduce their guiding masks exactly, segmented with the f that made
    # those masks (saved and reloaded as a store keeps it): mIoU 1
    from sgdm.annotation.features import extract
    from sgdm.annotation.stego import Segmenter, fit_segmenter

    images = torch.rand(6, 3, 16, 16, generator=generator) * 2 - 1
    feats = extract(space.backbone, images)
    stego = StegoConfig(method=method, dim=8, epochs=1, batch_size=4, feature_samples=0)
    segmenter = fit_segmenter(feats.patches, feats.cls, 3, stego, KMeansConfig(max_iter=10), generator)
    segmenter = Segmenter.load(segmenter.save(tmp_path / "f.safetensors"))
    assert (segmenter.head is None) == (method == "kmeans")
    masks = segmenter.assign(feats.patches, batch_size=4)
    out = mask_adherence(space, images, masks, 3, stego, KMeansConfig(), generator, batch_size=4, segmenter=segmenter)
    assert out == {"mask_miou": pytest.approx(1.0), "mask_pixel_accuracy": pytest.approx(1.0), "mask_matching": "identity",
                   "mask_miou_hungarian": pytest.approx(1.0), "mask_pixel_accuracy_hungarian": pytest.approx(1.0)}
    # f's ids are the guidance's: the same layout under other ids is not followed
    renamed = (masks.long() + 1) % 3
    out = mask_adherence(space, images, renamed, 3, stego, KMeansConfig(), generator, batch_size=4, segmenter=segmenter)
    assert out["mask_matching"] == "identity" and out["mask_miou_hungarian"] == pytest.approx(1.0)
    assert out["mask_miou"] == 0.0
    with pytest.raises(ValueError, match="D=5, the centroids"):
        Segmenter(torch.zeros(3, 32)).assign(torch.zeros(1, 2, 2, 5))


def test_mask_adherence_probe_scores_ids_directly(space, generator):
    # samples whose guiding masks are exactly what the probe sees in them: mIoU 1; the same
    # samples against each other's masks (the mismatched floor) and a bad mask batch
    from sgdm.evaluation.adherence import mask_adherence_probe, patch_tokens
    from sgdm.evaluation.probe import ProbeConfig, fit_probe

    images = torch.rand(6, 3, 16, 16, generator=generator) * 2 - 1
    images[:3, :, :, :8] = -1  # a dark left half in three images, a bright one in the others
    images[3:, :, :, :8] = 1
    masks = torch.zeros(6, 8, 8, dtype=torch.uint8)
    masks[:3, :, :4] = 1
    masks[3:, :, :4] = 2
    probe = fit_probe(patch_tokens(space, images), masks, 3, generator, ProbeConfig(epochs=40, batch_size=6, lr=0.1))
    guiding = probe.predict(patch_tokens(space, images), (8, 8))
    out = mask_adherence_probe(space, images, guiding.to(torch.uint8), probe, batch_size=4)
    assert out["mask_miou_probe"] == pytest.approx(1.0) and out["mask_pixel_accuracy_probe"] == pytest.approx(1.0)
    assert out["mask_miou_probe_mismatched"] < 0.9
    with pytest.raises(ValueError, match=r"masks: expected \[6, h, w\]"):
        mask_adherence_probe(space, images, guiding[:2].to(torch.uint8), probe)
    with pytest.raises(ValueError, match="class id 7 is outside the probe's 3 classes"):
        mask_adherence_probe(space, images, torch.full((6, 8, 8), 7, dtype=torch.uint8), probe)


def test_reference_cache_names_tell_backbones_apart(space, tmp_path, monkeypatch):
    """Two hub backbones whose ids share their first 16 characters (hub:vit_small_pa...), and the
    same weights under other backbone_kwargs, get their own cached reference statistics."""
    import dataclasses
    from types import SimpleNamespace

    import sgdm.evaluation.feature_distance as fdist
    from sgdm.evaluation.evaluate import _Evaluator, _ReferenceImages

    paths = []
    monkeypatch.setattr(fdist, "reference_stats", lambda space, batches, path: paths.append(path.name))
    images = torch.zeros(4, 3, 16, 16)
    b = space.backbone
    variants = [dataclasses.replace(b, weights_id="hub:vit_small_patch16_224.dino"),
                dataclasses.replace(b, weights_id="hub:vit_small_patch8_224.dino"),
                dataclasses.replace(b, weights_id="hub:vit_small_patch8_224.dino", input_size=(32, 32))]
    for backbone in variants:
        fake = SimpleNamespace(space=dataclasses.replace(space, backbone=backbone), data_key="d",
                               _reference=_ReferenceImages([{"image": x} for x in images], 4, uint8=False),
                               cache=tmp_path, _ref_stats=None)
        _Evaluator.reference_stats(fake)
    assert len(set(paths)) == 3 and all(":" not in p for p in paths), paths


def test_reference_cache_name_follows_the_feature_format(space, monkeypatch, tmp_path):
    """When what extraction returns changes (sgdm.annotation.cache.FEATURE_FORMAT, as when a ViT
    without a class token got its pooled feature as `cls`), cached reference statistics of the old
    features must not be read against the new ones."""
    from types import SimpleNamespace

    import sgdm.annotation.cache as feature_cache
    import sgdm.evaluation.feature_distance as fdist
    from sgdm.evaluation.evaluate import _Evaluator, _ReferenceImages

    names = []
    monkeypatch.setattr(fdist, "reference_stats", lambda space, batches, path: names.append(path.name))
    for version in (feature_cache.FEATURE_FORMAT, feature_cache.FEATURE_FORMAT + 1):
        monkeypatch.setattr(feature_cache, "FEATURE_FORMAT", version)
        images = [{"image": x} for x in torch.zeros(4, 3, 16, 16)]
        fake = SimpleNamespace(space=space, data_key="d", _reference=_ReferenceImages(images, 4, uint8=False),
                               cache=tmp_path, _ref_stats=None)
        _Evaluator.reference_stats(fake)
    assert names[0] != names[1], names


def test_reference_cache_name_follows_the_extraction_precision(space, monkeypatch, tmp_path):
    """Features extracted on CUDA run under bfloat16 autocast, on the CPU in float32: statistics cached
    by an evaluation on one must not be read by one on the other, which measures its samples' features
    at the other precision. (No GPU needed: the statistics themselves are not computed.)"""
    import dataclasses
    from types import SimpleNamespace

    import sgdm.evaluation.feature_distance as fdist
    from sgdm.evaluation.evaluate import _Evaluator, _ReferenceImages

    names = []
    monkeypatch.setattr(fdist, "reference_stats", lambda space, batches, path: names.append(path.name))
    for device in ("cpu", "cuda"):
        images = [{"image": x} for x in torch.zeros(4, 3, 16, 16)]
        fake = SimpleNamespace(space=dataclasses.replace(space, device=torch.device(device)), data_key="d",
                               _reference=_ReferenceImages(images, 4, uint8=False), cache=tmp_path, _ref_stats=None)
        _Evaluator.reference_stats(fake)
    assert names[0] != names[1], names
