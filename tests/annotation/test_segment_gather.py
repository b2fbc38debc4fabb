"""Distributed mask assignment sends each rank's class maps to rank 0 alone: an all-gather left every
rank holding every map (COCO's 118k at 64 px: 0.5 GB, and its pickles, on each of the ranks)."""
import pytest
import torch
import torch.distributed as dist

from sgdm.annotation import stego as stego_module
from sgdm.annotation.config import KMeansConfig, StegoConfig
from sgdm.annotation.stego import Segmenter, segment


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_receives_the_class_maps(rank, monkeypatch):
    received = []

    def all_gather_object(out, obj, group=None):
        out[:] = [obj] * len(out)
        received.append(len(out))

    def gather_object(obj, out=None, dst=0, group=None, **kwargs):
        if out is not None:
            out[:] = [obj] * len(out)
            received.append(len(out))

    monkeypatch.setattr(stego_module, "_rank_world", lambda distributed: (rank, 2))
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "gather_object", gather_object)
    patches = torch.randn(4, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    segmenter = Segmenter(torch.eye(3))
    masks = segment(patches, torch.zeros(4, 3), 3, StegoConfig(method="kmeans", mask_size=0), KMeansConfig(),
                    torch.Generator(), distributed=True, segmenter=segmenter)
    if rank == 0:
        assert received == [2] and masks.shape == (4, 2, 2)
    else:
        assert received == [] and masks is None
