"""source: gt holds one uint8 copy of the class maps: the maps go into one buffer a batch at a time, and neither
the images nor the samples' own (int64) maps are kept while the dataset is read (COCO-Stuff's 118k maps at
256 pixels: 7.7 GB as uint8, 62 GB as the int64 the datasets give)."""
import weakref

import pytest
import torch
from safetensors.torch import save
from torch.utils._python_dispatch import TorchDispatchMode

from sgdm.annotation.annotate import annotate
from sgdm.annotation import store as store_module
from sgdm.annotation.ground_truth import GroundTruthCollector, pack_gt
from sgdm.annotation.store import AnnotationStore

from .test_annotate import config

K = 5


class _Maps(torch.utils.data.Dataset):
    """A mask dataset as sgdm.data's are (float images, int64 class maps, None for an unreadable file);
    with ``track``, it notes as each image is read which earlier images' tensors are still alive."""

    mask_class_names = tuple("abcde")

    def __init__(self, n=24, side=8, unreadable=(), maps=None, track=False):
        self.ids, self.track = [f"img-{i:02d}" for i in range(n)], track
        self.side, self.unreadable, self.maps = side, set(unreadable), maps or {}
        self.refs, self.alive = {}, {}

    def __len__(self):
        return len(self.ids)

    def mask(self, i):
        if i in self.maps:
            return self.maps[i]
        mask = torch.randint(0, K, (self.side, self.side), generator=torch.Generator().manual_seed(i))
        mask[0, : i % self.side] = 255
        return mask

    def __getitem__(self, i):
        if self.track:  # refcounts free a dropped sample at once (no gc.collect: 0.1 s a call)
            self.alive[i] = [j for j, refs in self.refs.items() if any(r() is not None for r in refs)]
        if i in self.unreadable:
            return None
        sample = {"image": torch.zeros(3, self.side, self.side), "id": self.ids[i], "flipped": False,
                  "gt_mask": self.mask(i)}
        if self.track:
            self.refs[i] = (weakref.ref(sample["image"]), weakref.ref(sample["gt_mask"]))
        return sample


def _annotate(tmp_path, shapes_cache, dataset, **settings):
    cfg = config(tmp_path, "unused.pth", shapes_cache, source="gt", num_classes=K, batch_size=4, **settings)
    return AnnotationStore.open(annotate(cfg, "mask", dataset=dataset, progress=False, log=lambda m: None).store)


def test_reading_the_ground_truth_keeps_no_earlier_image_or_class_map(tmp_path, shapes_cache):
    dataset = _Maps(n=20, track=True)
    _annotate(tmp_path, shapes_cache, dataset)
    # the batch being read and the one before it (still bound to the loop's variables) may be alive
    held = {i: [j for j in alive if j < i - 2 * 4] for i, alive in dataset.alive.items()}
    assert not any(held.values()), held


class _LargeStorages(TorchDispatchMode):
    """The storages of at least ``nbytes`` bytes that ops produce (views of one storage count once)."""

    def __init__(self, nbytes):
        super().__init__()
        self.nbytes, self.storages = nbytes, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.nbytes:
                self.storages[t.untyped_storage().data_ptr()] = f"{func}: {t.dtype} {list(t.shape)}"
        return out


def test_a_ground_truth_mask_store_is_written_from_one_copy_of_the_class_maps(tmp_path, shapes_cache, monkeypatch):
    dataset = _Maps(n=24, side=8)  # all maps as uint8 are 2x an image (float32) and 3x a map (int64)
    monkeypatch.setattr(store_module, "_MULTI_HOT_BLOCK_PIXELS", 2 * 8 * 8)  # int64 temporaries of two maps a block
    with _LargeStorages(24 * 8 * 8) as seen:  # no stack, cat or clone of every map, int64 or uint8
        store = _annotate(tmp_path, shapes_cache, dataset, shard_size=10)
    assert len(seen.storages) == 1 and len(store) == 24, seen.storages


def test_the_store_holds_the_maps_of_the_readable_images_byte_for_byte(tmp_path, shapes_cache):
    dataset = _Maps(n=23, side=8, unreadable=(3, 22))
    store = _annotate(tmp_path, shapes_cache, dataset, shard_size=8)
    rows = [i for i in range(23) if i not in (3, 22)]
    assert store.ids == [dataset.ids[i] for i in rows]
    masks = torch.stack([dataset.mask(i).to(torch.uint8) for i in rows])  # the straightforward way
    multi_hot = torch.nn.functional.one_hot(masks.long().clamp(max=K), K + 1)[..., :K].amax((1, 2)).float()
    shards = store.manifest["shards"]
    assert [s["count"] for s in shards] == [8, 8, 5]
    for s in shards:
        rows_of = slice(s["start"], s["start"] + s["count"])
        expected = save({"mask": masks[rows_of].contiguous(), "multi_hot": multi_hot[rows_of].contiguous()})
        assert (store.path / s["file"]).read_bytes() == expected


def test_packed_class_maps_are_a_view_of_the_buffer_the_batches_were_written_into():
    collector = GroundTruthCollector(5)
    collector.add([{"gt_mask": torch.full((4, 4), 1)}, {"gt_mask": torch.full((4, 4), 2)}], ["a", "b"])
    first = collector.packed()["gt_mask"]
    collector.add([{"gt_mask": torch.full((4, 4), 3, dtype=torch.uint8)}], ["c"])
    later = collector.packed()["gt_mask"]
    assert later.dtype == torch.uint8 and later.tolist() == [[[v] * 4] * 4 for v in (1, 2, 3)]
    assert later.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    assert later.untyped_storage().nbytes() == 5 * 16  # sized for the capacity, trimmed by the view


def test_pack_gt_packs_labels_boxes_and_maps_as_before():
    samples = [{"gt_label": 2, "gt_boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 2, 3]]),
                "gt_box_labels": torch.tensor([1, 0]), "gt_mask": torch.tensor([[0, 255], [1, 2]])},
               {"gt_label": 0, "gt_boxes": torch.zeros(0, 4), "gt_box_labels": torch.zeros(0, dtype=torch.long),
                "gt_mask": torch.tensor([[3, 3], [3, 3]])}]
    packed = pack_gt(samples)
    assert packed["gt_label"].tolist() == [2, 0] and packed["gt_box_count"].tolist() == [2, 0]
    assert torch.equal(packed["gt_boxes"], samples[0]["gt_boxes"]) and packed["gt_box_labels"].tolist() == [1, 0]
    assert packed["gt_mask"].dtype == torch.uint8 and packed["gt_mask"].tolist() == [[[0, 255], [1, 2]], [[3] * 2] * 2]
    assert pack_gt([]) == {}


@pytest.mark.parametrize("value", [256, -1])
def test_a_class_map_value_that_uint8_cannot_hold_is_refused_naming_the_image(tmp_path, shapes_cache, value):
    bad = torch.zeros(8, 8, dtype=torch.long)
    bad[2, 5] = value  # stored as uint8 it would be class 0 (256) or ignore (-1), silently
    with pytest.raises(ValueError, match=rf"class map \(gt_mask\) of image 'img-06' has value {value}; "
                                         r"class maps hold 0-254 and 255 \(ignore\)"):
        _annotate(tmp_path, shapes_cache, _Maps(n=10, maps={6: bad}))


def test_a_class_map_of_another_shape_is_refused_naming_the_image(tmp_path, shapes_cache):
    with pytest.raises(ValueError, match=r"class map \(gt_mask\) of image 'img-05' is \[1, 8\], those before it "
                                         r"\[8, 8\]; every map must have one shape"):
        _annotate(tmp_path, shapes_cache, _Maps(n=10, maps={5: torch.zeros(1, 8, dtype=torch.long)}))


def test_a_sample_without_the_ground_truth_of_the_first_is_refused_naming_it():
    collector = GroundTruthCollector(3)
    collector.add([{"gt_label": 1, "gt_mask": torch.zeros(2, 2)}], ["first"])
    with pytest.raises(ValueError, match="image 'second' has no gt_mask \\(the images before it have gt_label, gt_mask\\)"):
        collector.add([{"gt_label": 0}], ["second"])


def test_multi_hot_of_int64_maps_leaves_them_as_they_were():
    """Its index (7 clamped to K, 255 filled with K) is made in place: on a copy, also when the maps are int64
    already (``.long()`` returns the maps themselves)."""
    masks = torch.tensor([[[0, 7], [255, 2]], [[1, 1], [1, 255]]])
    before = masks.clone()
    multi_hot = store_module.multi_hot_from_masks(masks, 3)
    assert torch.equal(masks, before) and multi_hot.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
