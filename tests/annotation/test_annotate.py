"""End to end: shapes dataset -> tiny ViT features -> store, for every granularity."""
import json
import types

import pytest
import torch

from sgdm.annotation import annotate as annotate_module
from sgdm.annotation.annotate import annotate
from sgdm.annotation.config import AnnotationConfig
from sgdm.annotation.store import AnnotationStore, StoreMismatchError
from sgdm.config.core import ConfigError, from_dict

from .conftest import TINY_KWARGS, TINY_VIT, folder_data, image_folder, shapes_data, tiny_vit


def config(tmp_path, weights, cache, num_images=48, data=None, **annotation):
    settings = dict(store=str(tmp_path / "store"), backbone=TINY_VIT, backbone_kwargs=TINY_KWARGS, weights=str(weights),
                    num_classes=6, batch_size=16, shard_size=16, lost={"num_clusters": 5, "k_patches": 6},
                    stego={"epochs": 1, "batch_size": 16, "dim": 8, "feature_samples": 0})
    settings.update(annotation)
    data = shapes_data(cache, num_images) if data is None else data
    return types.SimpleNamespace(data=data, annotation=from_dict(AnnotationConfig, settings, "annotation"))


@pytest.mark.parametrize("granularity", ["label", "box", "mask"])
def test_each_granularity_with_evaluate(tmp_path, tiny_weights, shapes_cache, granularity):
    cfg = config(tmp_path, tiny_weights, shapes_cache, num_classes=13 if granularity == "mask" else 6)
    result = annotate(cfg, granularity, evaluate=True, progress=False, log=lambda m: None)
    store = AnnotationStore.open(result.store)
    assert result.num_images == len(store) == 48 and store.granularity == granularity
    expected = {"label": {"nmi", "ari", "purity"}, "box": {"nmi", "ari", "purity", "corloc"}, "mask": {"miou", "pixel_accuracy"}}
    assert set(result.metrics) == expected[granularity]
    assert all(0.0 <= v <= 1.0 for k, v in result.metrics.items() if k != "ari")
    manifest = store.manifest
    assert manifest["metrics"] == result.metrics
    assert manifest["extractor"]["weights_sha256"] and manifest["dataset"]["ids_sha256"]
    assert manifest["num_classes"] == (5 if granularity == "box" else 13 if granularity == "mask" else 6)
    record = store.get(store.ids[0])
    if granularity == "box":
        box = record["box"]
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
    if granularity == "mask":
        # stego.mask_size 64 (the default) is clamped to the 32-pixel images; the tiny ViT's grid is 4x4
        assert record["mask"].shape == (32, 32) and int(record["mask"].max()) < 13
        assert manifest["crf"] is False and manifest["mask_hw"] == [32, 32] and manifest["patch_grid"] == [4, 4]


def test_resume_skips_finished_shards(tmp_path, tiny_weights, shapes_cache, monkeypatch):
    reference = annotate(config(tmp_path / "ref", tiny_weights, shapes_cache), progress=False, log=lambda m: None)
    cfg = config(tmp_path, tiny_weights, shapes_cache)
    real_save = annotate_module.FeatureCache.save
    saved = []

    def crash_after_two(self, shard, tensors, *args, **kwargs):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(shard)
        real_save(self, shard, tensors, *args, **kwargs)

    monkeypatch.setattr(annotate_module.FeatureCache, "save", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        annotate(cfg, progress=False, log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="unfinished run"):
        AnnotationStore.open(cfg.annotation.store)
    monkeypatch.setattr(annotate_module.FeatureCache, "save", real_save)
    extracted = []
    real_extract = annotate_module._extract_shard

    def counting(backbone, dataset, indices, *args):
        extracted.append(indices[0])
        return real_extract(backbone, dataset, indices, *args)

    monkeypatch.setattr(annotate_module, "_extract_shard", counting)
    messages = []
    annotate(cfg, progress=False, log=messages.append)
    assert extracted == [32]  # shards 0 and 1 (images 0-31) were not redone
    assert any("resuming, 2 of 3" in m for m in messages)
    ours, ref = AnnotationStore.open(cfg.annotation.store), AnnotationStore.open(reference.store)
    assert ours.ids == ref.ids and torch.equal(ours.tensor("cluster"), ref.tensor("cluster"))


def test_features_of_other_weights_are_refused(tmp_path, tiny_weights, shapes_cache):
    from safetensors.torch import save_file

    annotate(config(tmp_path, tiny_weights, shapes_cache), progress=False, log=lambda m: None)
    other = tmp_path / "other.safetensors"
    save_file(tiny_vit(seed=5).state_dict(), str(other))
    with pytest.raises(StoreMismatchError, match="weights differ"):
        annotate(config(tmp_path, other, shapes_cache), progress=False, log=lambda m: None)


def test_lost_settings_reach_the_boxes_and_the_fingerprint(tmp_path, tiny_weights, shapes_cache):
    from sgdm.annotation.features import load_backbone
    from sgdm.annotation.lost import lost_boxes
    from sgdm.data import build_dataset

    lost = {"num_clusters": 5, "k_patches": 2, "features": "tokens", "center": True}
    cfg = config(tmp_path, tiny_weights, shapes_cache, lost=lost)
    store = AnnotationStore.open(annotate(cfg, "box", progress=False, log=lambda m: None).store)
    data = build_dataset(cfg.data, train=False)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    expected = lost_boxes(load_backbone(TINY_VIT, tiny_weights, TINY_KWARGS), images, cfg.annotation.lost)
    found = torch.stack([store.get(i)["box"].float() for i in data.ids])
    torch.testing.assert_close(found, expected, atol=1e-3, rtol=0)  # the store keeps boxes in fp16
    with pytest.raises(StoreMismatchError, match="extract differ"):  # other LOST settings: never mixed in
        annotate(config(tmp_path, tiny_weights, shapes_cache, lost={**lost, "center": False}), "box", progress=False)
    with pytest.raises(ConfigError, match="annotation.lost.features"):
        from_dict(AnnotationConfig, {"lost": {"features": "attention"}}, "annotation")


def test_mask_store_keeps_its_segmenter(tmp_path, tiny_weights, shapes_cache):
    from sgdm.annotation.features import extract, load_backbone
    from sgdm.data import build_dataset

    cfg = config(tmp_path, tiny_weights, shapes_cache, num_classes=5)
    store = AnnotationStore.open(annotate(cfg, "mask", progress=False, log=lambda m: None).store)
    assert cfg.annotation.granularity == "label" and store.manifest["params"]["granularity"] == "mask"  # as made
    segmenter = store.segmenter()
    assert segmenter is not None and segmenter.num_classes == 5 and segmenter.head is not None  # method: stego
    data = build_dataset(cfg.data, train=False)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    patches = extract(load_backbone(TINY_VIT, tiny_weights, TINY_KWARGS), images).patches
    # the store's masks come from the head's codes of fp16-cached features; allow a rare tie flip
    same = (segmenter.assign(patches) == torch.stack([store.get(i)["mask"] for i in data.ids])).float().mean()
    assert same > 0.98
    (store.path / store.manifest["segmenter"]).unlink()
    with pytest.raises(FileNotFoundError, match="segmenter file segmenter.safetensors is missing"):
        store.segmenter()


def test_store_refused_for_another_dataset(tmp_path, tiny_weights, shapes_cache):
    result = annotate(config(tmp_path, tiny_weights, shapes_cache, num_images=24), progress=False, log=lambda m: None)
    from sgdm.data import build_dataset

    bigger = build_dataset(shapes_data(shapes_cache, 48), train=False)
    with pytest.raises(StoreMismatchError, match="lacks 24 of the dataset's 48 image ids"):
        AnnotationStore.open(result.store).check_matches(bigger.ids, 6)


@pytest.mark.parametrize("granularity,k", [("label", 12), ("box", 12), ("mask", 13)])
def test_ground_truth_store(tmp_path, shapes_cache, granularity, k):
    from sgdm.data import build_dataset

    cfg = config(tmp_path, "unused.pth", shapes_cache, source="gt", num_classes=k, lost={"num_clusters": k})
    result = annotate(cfg, granularity, progress=False, log=lambda m: None)
    store = AnnotationStore.open(result.store)
    assert store.source == "gt" and store.method == "ground-truth" and store.num_classes == k
    assert store.segmenter() is None  # no self-segmentation f behind ground-truth masks
    dataset = build_dataset(cfg.data, train=False)
    sample = dataset[3]
    record = store.get(sample["id"])
    if granularity == "label":
        assert record["cluster"] == sample["gt_label"]
    elif granularity == "box":
        boxes = torch.as_tensor(sample["gt_boxes"])
        largest = int(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argmax())
        torch.testing.assert_close(record["box"] * 32, boxes[largest].float())
        assert record["cluster"] == int(sample["gt_box_labels"][largest])
    else:
        assert torch.equal(record["mask"].long(), sample["gt_mask"])
        assert torch.equal(record["multi_hot"][1:], sample["gt_multi_hot"])  # mask value = class + 1


def test_ground_truth_k_too_small(tmp_path, shapes_cache):
    cfg = config(tmp_path, "unused.pth", shapes_cache, source="gt", num_classes=4)
    with pytest.raises(ConfigError, match="annotation.num_classes: 4 is too small"):
        annotate(cfg, "label", progress=False, log=lambda m: None)


def test_bad_input(tmp_path, tiny_weights, shapes_cache):
    with pytest.raises(ConfigError, match="annotation.num_classes: K=60 clusters is more than the dataset's 48 images"):
        annotate(config(tmp_path, tiny_weights, shapes_cache, num_classes=60), progress=False)
    with pytest.raises(ConfigError, match="annotation.lost.num_clusters: K=50"):
        annotate(config(tmp_path, tiny_weights, shapes_cache, lost={"num_clusters": 50}), "box", progress=False)
    with pytest.raises(ConfigError, match="data: the dataset .* has no images"):
        annotate(config(tmp_path, tiny_weights, shapes_cache), dataset=[], progress=False)
    with pytest.raises(ConfigError, match="annotation.granularity: expected label, box or mask"):
        annotate(config(tmp_path, tiny_weights, shapes_cache), "points", progress=False)
    with pytest.raises(ConfigError, match="annotation.backbone_kwargs"):
        from_dict(AnnotationConfig, {"backbone_kwargs": "img_size=64"}, "annotation")


class SkipsOne(torch.utils.data.Dataset):
    """A dataset whose item 3 cannot be read (the data layer returns None for it)."""

    def __init__(self, inner):
        self.inner, self.ids = inner, inner.ids

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return None if i == 3 else self.inner[i]


def test_unreadable_images_are_left_out_and_listed(tmp_path, tiny_weights, shapes_cache):
    from sgdm.data import build_dataset

    cfg = config(tmp_path, tiny_weights, shapes_cache, num_images=20)
    dataset = SkipsOne(build_dataset(cfg.data, train=False))
    result = annotate(cfg, dataset=dataset, progress=False, log=lambda m: None)
    store = AnnotationStore.open(result.store)
    assert result.num_images == 19 and dataset.ids[3] not in store
    assert store.ids == dataset.ids[:3] + dataset.ids[4:]
    assert store.manifest["dataset"]["skipped"] == [dataset.ids[3]]
    with pytest.raises(StoreMismatchError, match="lacks 1 of the dataset's 20 image ids"):
        store.check_matches(dataset.ids)


def test_reclustering_with_another_k_reuses_features(tmp_path, tiny_weights, shapes_cache, monkeypatch):
    annotate(config(tmp_path, tiny_weights, shapes_cache), progress=False, log=lambda m: None)
    calls = []
    monkeypatch.setattr(annotate_module, "_extract_shard", lambda *args: calls.append(args))
    result = annotate(config(tmp_path, tiny_weights, shapes_cache, num_classes=3), progress=False, log=lambda m: None)
    assert calls == []
    store = AnnotationStore.open(result.store)
    assert store.num_classes == 3 and int(store.tensor("cluster").max()) <= 2 and len(store) == 48


def test_a_file_name_that_is_not_utf8_is_annotated_and_kept_in_the_store(tmp_path, tiny_weights):
    import os

    from sgdm.annotation.gallery import write_gallery
    from sgdm.data import build_dataset

    root = image_folder(tmp_path / "imgs", good=5, bad=False)
    os.rename(root / "img_04.png", os.path.join(os.fsencode(root), b"caf\xe9.png"))  # Latin-1 name
    cfg = config(tmp_path, tiny_weights, None, data=folder_data(root), num_classes=2)
    store = AnnotationStore.open(annotate(cfg, progress=False, log=lambda m: None).store)
    name = os.fsdecode(b"caf\xe9.png")
    assert name in store and len(store) == 5  # the manifest (JSON) keeps the escaped name
    dataset = build_dataset(cfg.data, train=False)
    store.check_matches(dataset.ids, 2)
    page = write_gallery(store, dataset, tmp_path / "g.html").read_text(encoding="utf-8")
    assert "caf\\xe9.png" in page


def folder_config(tmp_path, weights, root, **data):
    return config(tmp_path, weights, None, data=folder_data(root, **data), num_classes=2, shard_size=2)


def test_features_of_other_pixels_are_refused_naming_the_data_setting(tmp_path, tiny_weights):
    import shutil

    root = image_folder(tmp_path / "imgs", good=6, bad=False)
    annotate(folder_config(tmp_path, tiny_weights, root), progress=False, log=lambda m: None)
    other = shutil.copytree(root, tmp_path / "other")  # the same file names, maybe other pictures
    with pytest.raises(StoreMismatchError, match=rf"\(data.root differ; they were data.root={root}\); delete "
                                                 rf"{tmp_path / 'store' / 'work'} to re-extract"):
        annotate(folder_config(tmp_path, tiny_weights, other), progress=False, log=lambda m: None)
    with pytest.raises(StoreMismatchError, match=r"\(data.size differ; they were data.size=32\)"):
        annotate(folder_config(tmp_path, tiny_weights, root, size=40), progress=False, log=lambda m: None)
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(f"img_{i:02d}.png" for i in range(6)))  # the same ids, named by a list
    with pytest.raises(StoreMismatchError, match=r"\(data.list_file differ; they were data.list_file=None\)"):
        annotate(folder_config(tmp_path, tiny_weights, root, list_file=str(listed)), progress=False, log=lambda m: None)


def test_a_repaired_file_is_extracted_again_on_rerun(tmp_path, tiny_weights, monkeypatch):
    import shutil

    root = image_folder(tmp_path / "imgs", good=5, bad=True)  # img_bad.png is index 5: shard 2 of 3
    cfg = folder_config(tmp_path, tiny_weights, root)
    store = AnnotationStore.open(annotate(cfg, progress=False, log=lambda m: None).store)
    assert "img_bad.png" not in store and store.manifest["dataset"]["skipped"] == ["img_bad.png"]
    shutil.copy(root / "img_00.png", root / "img_bad.png")  # what the log told the user to fix
    extracted, messages = [], []
    real_extract = annotate_module._extract_shard

    def counting(backbone, dataset, indices, *args):
        extracted.append(list(indices))
        return real_extract(backbone, dataset, indices, *args)

    monkeypatch.setattr(annotate_module, "_extract_shard", counting)
    store = AnnotationStore.open(annotate(cfg, progress=False, log=messages.append).store)
    assert extracted == [[4, 5]]  # only the shard of the repaired file
    assert any("extracting 1 feature shard(s) again" in m and "img_bad.png" in m for m in messages)
    assert "img_bad.png" in store and store.manifest["dataset"]["skipped"] == [] and len(store) == 6
    extracted.clear()
    annotate(cfg, progress=False, log=lambda m: None)
    assert extracted == []  # nothing changed since: everything is reused


def test_features_cached_before_data_settings_were_recorded_are_refused_clearly(tmp_path, tiny_weights):
    root = image_folder(tmp_path / "imgs", good=6, bad=False)
    cfg = folder_config(tmp_path, tiny_weights, root)
    annotate(cfg, progress=False, log=lambda m: None)
    fingerprint = tmp_path / "store" / "work" / "fingerprint.json"
    old = {k: v for k, v in json.loads(fingerprint.read_text()).items() if not k.startswith("data.")}
    fingerprint.write_text(json.dumps(old))  # as an older sgdm wrote it
    with pytest.raises(StoreMismatchError, match=r"made by an sgdm that did not record data.dataset, .*data.root.*; "
                                                 r"delete .*work to re-extract"):
        annotate(cfg, progress=False, log=lambda m: None)


def _as_older_sgdm_wrote_it(work, feature_format=None, **fingerprint):
    """Rewrite the cache in ``work`` as an sgdm of another feature format would have: fingerprint and
    shards without the current format (``feature_format`` None: unrecorded, as before it existed),
    ``cls`` replaced (stale features must not reach the store)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = work / "fingerprint.json"
    old = {k: v for k, v in json.loads(path.read_text()).items() if k != "feature_format"}
    old.update({} if feature_format is None else {"feature_format": feature_format}, **fingerprint)
    path.write_text(json.dumps(old))
    for shard in sorted(work.glob("features_*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            metadata = {k: v for k, v in handle.metadata().items() if k != "feature_format"}
        if feature_format is not None:
            metadata["feature_format"] = str(feature_format)
        tensors = load_file(str(shard))
        tensors["cls"] = torch.zeros_like(tensors["cls"])
        save_file(tensors, str(shard), metadata=metadata)


@pytest.mark.parametrize("feature_format", [None, 1, 3])
def test_features_of_another_feature_format_are_extracted_again(tmp_path, tiny_weights, shapes_cache, monkeypatch,
                                                                  feature_format):
    from sgdm.annotation.cache import FEATURE_FORMAT

    cfg = config(tmp_path, tiny_weights, shapes_cache)
    reference = AnnotationStore.open(annotate(cfg, progress=False, log=lambda m: None).store).tensor("cluster")
    work = tmp_path / "store" / "work"
    assert json.loads((work / "fingerprint.json").read_text())["feature_format"] == FEATURE_FORMAT
    _as_older_sgdm_wrote_it(work, feature_format)
    extracted, messages = [], []
    real_extract = annotate_module._extract_shard
    monkeypatch.setattr(annotate_module, "_extract_shard",
                        lambda backbone, dataset, indices, *args: extracted.append(indices[0]) or
                        real_extract(backbone, dataset, indices, *args))
    store = AnnotationStore.open(annotate(cfg, progress=False, log=messages.append).store)
    assert extracted == [0, 16, 32]  # every shard again: none is reused
    assert any(f"extracting 3 feature shard(s) again: an older sgdm wrote them in another feature format "
               f"(this one writes format {FEATURE_FORMAT})" in m for m in messages)
    assert torch.equal(store.tensor("cluster"), reference)  # not the stale (zeroed) cls features
    assert json.loads((work / "fingerprint.json").read_text())["feature_format"] == FEATURE_FORMAT
    extracted.clear()
    annotate(cfg, progress=False, log=lambda m: None)
    assert extracted == []  # the rebuilt cache is reused


def test_features_of_another_format_and_other_settings_are_refused_naming_both(tmp_path, tiny_weights, shapes_cache):
    cfg = config(tmp_path, tiny_weights, shapes_cache)
    annotate(cfg, progress=False, log=lambda m: None)
    _as_older_sgdm_wrote_it(tmp_path / "store" / "work", 1, shard_size=8)
    with pytest.raises(StoreMismatchError, match=r"\(feature_format, shard_size differ; they were feature_format=1, "
                                                 r"shard_size=8\); delete"):
        annotate(cfg, progress=False, log=lambda m: None)


def test_mask_size_changes_the_masks_not_the_features_and_a_store_of_another_size_is_named(
        tmp_path, tiny_weights, shapes_cache, monkeypatch):
    messages = []
    coarse_cfg = config(tmp_path, tiny_weights, shapes_cache, num_classes=4,
                        stego={"method": "kmeans", "mask_size": 0})
    coarse = AnnotationStore.open(annotate(coarse_cfg, "mask", evaluate=True, progress=False, log=lambda m: None).store)
    coarse_masks = coarse.tensor("mask")
    assert coarse_masks.shape == (48, 4, 4) and coarse.manifest["mask_hw"] == [4, 4]
    extracted = []
    monkeypatch.setattr(annotate_module, "_extract_shard", lambda *args: extracted.append(1))
    fine_cfg = config(tmp_path, tiny_weights, shapes_cache, num_classes=4, stego={"method": "kmeans", "mask_size": 16})
    assert coarse.settings_differ(fine_cfg.annotation) == ["stego.mask_size"]  # never read as the other size
    fine = AnnotationStore.open(annotate(fine_cfg, "mask", evaluate=True, progress=False, log=messages.append).store)
    assert extracted == []  # the cached patch features serve every mask size
    assert fine.tensor("mask").shape == (48, 16, 16) and fine.manifest["mask_hw"] == [16, 16]
    assert fine.segmenter().mask_size == 16 and set(fine.manifest["metrics"]) == {"miou", "pixel_accuracy"}
    assert fine.settings_differ(fine_cfg.annotation) == [] and fine.settings_differ(coarse_cfg.annotation) == ["stego.mask_size"]
    # sizes that draw the same grid are the same setting: <= the 4x4 patch grid, or >= the 32-pixel side
    grid_cfg = config(tmp_path, tiny_weights, shapes_cache, num_classes=4, stego={"method": "kmeans", "mask_size": 3})
    assert coarse.settings_differ(grid_cfg.annotation) == []
    for size in (8, 32):
        other = config(tmp_path, tiny_weights, shapes_cache, num_classes=4, stego={"method": "kmeans", "mask_size": size})
        assert fine.settings_differ(other.annotation) == ["stego.mask_size"]
    # the same f (patch k-means, same seed): the fine maps pooled back to the grid mostly agree with the coarse ones
    blocks = fine.tensor("mask").long().reshape(48, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(48, 4, 4, 16)
    assert (blocks.mode(-1).values == coarse_masks.long()).float().mean() > 0.8
    # a store made before stego.mask_size existed holds patch-grid masks: it matches 0, not the default
    manifest = json.loads((fine.path / "manifest.json").read_text())
    del manifest["params"]["stego"]["mask_size"]
    (fine.path / "manifest.json").write_text(json.dumps(manifest))
    old = AnnotationStore.open(fine.path)
    assert old.settings_differ(coarse_cfg.annotation) == []
    default_cfg = config(tmp_path, tiny_weights, shapes_cache, num_classes=4, stego={"method": "kmeans"})
    assert old.settings_differ(default_cfg.annotation) == ["stego.mask_size"]
    # masks drawn at the default 64 clamped to 32-pixel images: any size from the image side up is the same
    manifest["params"]["stego"]["mask_size"], manifest["mask_hw"] = 64, [32, 32]
    (fine.path / "manifest.json").write_text(json.dumps(manifest))
    clamped = AnnotationStore.open(fine.path)
    for size, differ in ((32, []), (48, []), (16, ["stego.mask_size"]), (0, ["stego.mask_size"])):
        other = config(tmp_path, tiny_weights, shapes_cache, num_classes=4, stego={"method": "kmeans", "mask_size": size})
        assert clamped.settings_differ(other.annotation) == differ, size


def test_crf_masks_are_refined_on_the_dataset_images_read_a_batch_at_a_time_and_recorded(
        tmp_path, tiny_weights, shapes_cache, monkeypatch):
    from sgdm.annotation.patches import ShardPatches
    from sgdm.annotation.stego import Segmenter
    from sgdm.config.core import to_dict
    from sgdm.data import build_dataset

    reads = []
    read = annotate_module._DatasetImages.__getitem__
    monkeypatch.setattr(annotate_module._DatasetImages, "__getitem__",
                        lambda self, index: reads.append(len(self.indices[index])) or read(self, index))
    stego = {"method": "kmeans", "mask_size": 0, "batch_size": 8}
    cfg = config(tmp_path, tiny_weights, shapes_cache, num_images=24, num_classes=4,
                 stego={**stego, "crf": {"enabled": True}})
    store = AnnotationStore.open(annotate(cfg, "mask", progress=False, log=lambda m: None).store)
    assert reads == [8] * 3  # the 24 images again, one step of the segmenter at a time, never all at once
    crf = cfg.annotation.stego.crf
    assert store.manifest["crf"] == to_dict(crf) and store.manifest["params"]["stego"]["crf"] == to_dict(crf)
    segmenter = store.segmenter()
    assert segmenter.crf == crf  # adherence segments samples with the same f
    # the store's maps: the cached features' codes refined on the images the features came from
    data = build_dataset(cfg.data, train=False)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    patches = ShardPatches(sorted((store.path / "work").glob("features_*.safetensors")))
    masks = store.tensor("mask")
    assert torch.equal(segmenter.assign(patches, images=images), masks)
    assert not torch.equal(Segmenter(segmenter.centroids, segmenter.head, segmenter.mask_size).assign(patches), masks)
    # a store made with the CRF is not taken for one without it, nor for other CRF settings
    plain = config(tmp_path, tiny_weights, shapes_cache, num_images=24, num_classes=4, stego=stego)
    assert store.settings_differ(plain.annotation) == ["stego.crf.enabled"]
    other = config(tmp_path, tiny_weights, shapes_cache, num_images=24, num_classes=4,
                   stego={**stego, "crf": {"enabled": True, "alpha": 5}})
    assert store.settings_differ(other.annotation) == ["stego.crf.alpha"]


def test_a_store_without_crf_matches_any_disabled_crf_settings(tmp_path, tiny_weights, shapes_cache):
    stego = {"method": "kmeans", "mask_size": 0}
    cfg = config(tmp_path, tiny_weights, shapes_cache, num_classes=4, stego=stego)
    store = AnnotationStore.open(annotate(cfg, "mask", progress=False, log=lambda m: None).store)
    assert store.manifest["crf"] is False and store.segmenter().crf is None
    unused = config(tmp_path, tiny_weights, shapes_cache, num_classes=4, stego={**stego, "crf": {"alpha": 5}})
    assert store.settings_differ(unused.annotation) == []  # settings of a CRF that does not run change nothing
    manifest = json.loads((store.path / "manifest.json").read_text())
    del manifest["params"]["stego"]["crf"]  # a store made before the option
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    assert AnnotationStore.open(store.path).settings_differ(cfg.annotation) == []


def test_an_image_unreadable_when_read_again_for_the_crf_is_named():
    unreadable = type("Dataset", (), {"ids": ["a.png", "b.png"], "__getitem__": lambda self, i: None})()
    with pytest.raises(ValueError, match=r"image a.png \(dataset index 0\) can no longer be read"):
        annotate_module._DatasetImages(unreadable, [0, 1])[0:2]
