import json

import pytest
import torch

from sgdm.annotation.store import AnnotationStore, StoreMismatchError, multi_hot_from_masks, write_store

IDS = [f"img-{i:03d}" for i in range(7)]


def records(granularity, k=5):
    g = torch.Generator().manual_seed(0)
    if granularity == "label":
        return {"cluster": torch.randint(k, (7,), generator=g)}
    if granularity == "box":
        return {"cluster": torch.randint(k, (7,), generator=g), "box": torch.rand(7, 4, generator=g)}
    masks = torch.randint(k, (7, 4, 4), generator=g).to(torch.uint8)
    masks[0, 0, 0] = 255
    return {"mask": masks}


@pytest.mark.parametrize("granularity", ["label", "box", "mask"])
def test_round_trip(tmp_path, granularity):
    rec = records(granularity)
    store = write_store(tmp_path / "s", IDS, rec, granularity=granularity, num_classes=5, shard_size=3,
                        extra={"method": "test", "source": "self"})
    assert len(list((tmp_path / "s").glob("shard_*.safetensors"))) == 3  # 3 + 3 + 1
    store = AnnotationStore.open(tmp_path / "s")
    assert store.ids == IDS and store.num_classes == 5 and store.granularity == granularity
    assert store.source == "self" and store.method == "test"
    for i, image_id in enumerate(IDS):
        got = store.get(image_id)
        if "cluster" in rec:
            assert got["cluster"] == int(rec["cluster"][i]) and isinstance(got["cluster"], int)
        if "box" in rec:
            assert torch.equal(got["box"], rec["box"][i])
        if "mask" in rec:
            assert torch.equal(got["mask"], rec["mask"][i]) and got["mask"].dtype == torch.uint8
            present = set(rec["mask"][i].flatten().tolist()) - {255}
            assert set(got["multi_hot"].nonzero().flatten().tolist()) == present
    field = {"label": "cluster", "box": "box", "mask": "mask"}[granularity]
    assert torch.equal(store.tensor(field), rec[field])


def test_multi_hot_is_max_pool_of_one_hot():
    masks = torch.tensor([[[0, 2], [2, 255]], [[1, 1], [1, 1]]], dtype=torch.uint8)
    one_hot = torch.nn.functional.one_hot(masks.long().clamp(max=2), 3).float() * (masks != 255)[..., None]
    torch.testing.assert_close(multi_hot_from_masks(masks, 3), one_hot.amax((1, 2)))
    # on the masks' own device (the pipeline's class maps may be CUDA tensors; meta stands in here)
    assert multi_hot_from_masks(masks.to("meta"), 3).device.type == "meta"


def test_check_matches(tmp_path):
    store = write_store(tmp_path, IDS, records("label"), granularity="label", num_classes=5)
    store.check_matches(IDS[2:], 5)
    with pytest.raises(StoreMismatchError, match="lacks 2 of the dataset's 9 image ids.*'other-0'"):
        store.check_matches(IDS + ["other-0", "other-1"], 5)
    with pytest.raises(StoreMismatchError, match="K=5 classes, the model expects 7"):
        store.check_matches(IDS, 7)


def test_unknown_id_and_field(tmp_path):
    store = write_store(tmp_path, IDS, records("label"), granularity="label", num_classes=5)
    with pytest.raises(KeyError, match="no image id 'nope'"):
        store.get("nope")
    with pytest.raises(KeyError, match="no field 'box'"):
        store.tensor("box")


def test_open_refuses_missing_or_foreign(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        AnnotationStore.open(tmp_path)
    write_store(tmp_path, IDS, records("label"), granularity="label", num_classes=5)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version 99"):
        AnnotationStore.open(tmp_path)


def test_missing_shard_named(tmp_path):
    store = write_store(tmp_path, IDS, records("label"), granularity="label", num_classes=5, shard_size=4)
    (tmp_path / "shard_00001.safetensors").unlink()
    assert store.get(IDS[0])["cluster"] >= 0
    with pytest.raises(FileNotFoundError, match="shard_00001.safetensors is missing"):
        store.get(IDS[5])


@pytest.mark.parametrize(
    "granularity,rec,message",
    [
        ("label", {"cluster": torch.full((7,), 5)}, r"cluster ids must lie in \[0, 5\)"),
        ("label", {"cluster": torch.zeros(6, dtype=torch.long)}, "6 rows for 7 ids"),
        ("box", {"cluster": torch.zeros(7, dtype=torch.long)}, "needs field 'box'"),
        ("mask", {"mask": torch.full((7, 2, 2), 9, dtype=torch.uint8)}, "mask values must be < K=5"),
        ("points", {}, "granularity must be one of"),
    ],
)
def test_write_rejects_bad_records(tmp_path, granularity, rec, message):
    with pytest.raises(ValueError, match=message):
        write_store(tmp_path, IDS, rec, granularity=granularity, num_classes=5)
    assert not (tmp_path / "manifest.json").exists()


def test_duplicate_ids_refused(tmp_path):
    with pytest.raises(ValueError, match="not unique"):
        write_store(tmp_path, ["a", "a"], {"cluster": torch.zeros(2, dtype=torch.long)}, granularity="label", num_classes=1)


def test_settings_differ_names_what_changed_the_annotations(tmp_path):
    import dataclasses

    from sgdm.annotation.config import AnnotationConfig, LostConfig
    from sgdm.config.core import to_dict
    from sgdm.quickstart.stages import reusable_store

    made = AnnotationConfig(store=tmp_path / "s", granularity="box", num_classes=5, lost=LostConfig(k_patches=20, num_clusters=5))
    params = to_dict(made)
    del params["lost"]["center"], params["lost"]["features"]  # a store written before these settings existed
    write_store(made.store, IDS, records("box"), granularity="box", num_classes=5, extra={"params": params})
    store = AnnotationStore.open(made.store)
    assert store.settings_differ(made) == []  # missing settings count at their defaults
    assert reusable_store(made)
    how = dataclasses.replace(made, batch_size=7, device="cpu", shard_size=2,
                              stego=dataclasses.replace(made.stego, epochs=3))  # stego: not a box setting
    assert store.settings_differ(how) == []
    what = dataclasses.replace(made, seed=1, lost=dataclasses.replace(made.lost, center=True, features="tokens"))
    assert store.settings_differ(what) == ["lost.center", "lost.features", "seed"]
    with pytest.raises(StoreMismatchError, match=r"annotation.lost.center, annotation.lost.features, annotation.seed differ"):
        reusable_store(what)
    assert not reusable_store(dataclasses.replace(made, store=tmp_path / "missing"))


def test_ids_hash_takes_the_bytes_of_a_name_that_is_not_utf8():
    import hashlib
    import os

    from sgdm.annotation.store import ids_hash

    assert ids_hash(["a.png", "b/é.png"]) == hashlib.sha256("a.png\nb/é.png\n".encode()).hexdigest()  # old stores
    assert ids_hash([os.fsdecode(b"caf\xe9.png")]) == hashlib.sha256(b"caf\xe9.png\n").hexdigest()


def test_multi_hot_is_computed_a_block_of_masks_at_a_time(monkeypatch):
    """As int64 the whole of a 256-pixel ground-truth store at once would be ~24 bytes a pixel
    (185 GB for COCO's 118k images); blocks bound it and give the same vectors."""
    from sgdm.annotation import store as store_module
    from sgdm.annotation.store import multi_hot_from_masks

    masks = torch.randint(0, 6, (30, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    masks[::4] = 255
    whole = multi_hot_from_masks(masks, 6)
    seen = []
    real = torch.Tensor.long

    def spy(self, *args, **kwargs):
        seen.append(self.numel())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(store_module, "_MULTI_HOT_BLOCK_PIXELS", 7 * 64, raising=False)
    monkeypatch.setattr(torch.Tensor, "long", spy)
    blocked = multi_hot_from_masks(masks, 6)
    monkeypatch.undo()
    assert max(seen) <= 7 * 64 and torch.equal(blocked, whole)


def test_a_mask_store_of_more_classes_than_uint8_maps_hold_is_refused_as_such(tmp_path):
    masks = torch.tensor([[[50]]], dtype=torch.uint8)  # uint8 compared with K=300 wrapped: "got 50"
    with pytest.raises(ValueError, match=r"write_store: a mask store holds at most 255 classes .*got num_classes=300"):
        write_store(tmp_path, ["a"], {"mask": masks}, granularity="mask", num_classes=300)
    write_store(tmp_path, ["a"], {"mask": masks}, granularity="mask", num_classes=255)
    with pytest.raises(ValueError, match=r"mask values must be < K=50 or 255, got 50"):
        write_store(tmp_path, ["a"], {"mask": masks}, granularity="mask", num_classes=50)
