"""source: gt keeps only the ground truth of the images it reads, never every decoded image."""
from sgdm.annotation import annotate as annotate_module
from sgdm.annotation.annotate import annotate
from sgdm.annotation.store import AnnotationStore

from .test_annotate import config


def test_ground_truth_annotation_does_not_hold_the_images(tmp_path, shapes_cache, monkeypatch):
    held = []
    real = annotate_module.pack_gt

    def spy(samples):
        held.extend(sorted(k for k in samples[0] if not k.startswith("gt_")))
        return real(samples)

    monkeypatch.setattr(annotate_module, "pack_gt", spy)
    cfg = config(tmp_path, "unused.pth", shapes_cache, source="gt", num_classes=12)
    store = AnnotationStore.open(annotate(cfg, "label", progress=False, log=lambda m: None).store)
    assert held == []  # 256-pixel COCO: 93 GB of float32 images held until the end, for 118k labels
    assert len(store) == 48 and store.manifest["image_size"] == [32, 32]
