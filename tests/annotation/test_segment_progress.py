"""Assigning class maps reports its progress (the dense CRF of COCO's 118k images is a long pass):
after each step, the images of this rank's share done so far and the share's size."""
import torch

from sgdm.annotation import stego as stego_module
from sgdm.annotation.config import KMeansConfig, StegoConfig
from sgdm.annotation.stego import Segmenter, segment


def _patches(n=5):
    return torch.randn(n, 2, 2, 3, generator=torch.Generator().manual_seed(0))


def test_assign_reports_the_images_done_after_each_step():
    calls = []
    masks = Segmenter(torch.eye(3)).assign(_patches(), batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)] and masks.shape == (5, 2, 2)


def test_segment_reports_this_ranks_share(monkeypatch):
    monkeypatch.setattr(stego_module, "_rank_world", lambda distributed: (1, 2))
    monkeypatch.setattr(torch.distributed, "gather_object", lambda obj, out=None, dst=0, **kwargs: None)
    calls = []
    segment(_patches(), torch.zeros(5, 3), 3, StegoConfig(method="kmeans", mask_size=0, batch_size=4), KMeansConfig(),
            torch.Generator(), distributed=True, segmenter=Segmenter(torch.eye(3)),
            progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 2)]  # rank 1 of 2 assigns images 3 and 4


def test_annotate_shows_the_masks_being_assigned(tmp_path, tiny_weights, shapes_cache, capsys):
    from sgdm.annotation.annotate import annotate

    from .test_annotate import config

    stego = {"epochs": 1, "batch_size": 16, "dim": 8, "feature_samples": 0, "method": "kmeans"}
    annotate(config(tmp_path, tiny_weights, shapes_cache, 16, num_classes=3, stego=stego), "mask", log=lambda m: None)
    err = capsys.readouterr().err
    assert "masks: 100%" in err and "16/16" in err
