"""The CLS features go to k-means as one float32 copy: at full ImageNet (1.28M x 768) the half-precision
features are 2 GB and each float32 copy 3.9 GB, and a second copy (the normalised one, made beside the
cast) took the host's peak from ~6 GB to ~10 GB."""
import types

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sgdm.annotation import annotate as annotate_module
from sgdm.annotation.config import KMeansConfig
from sgdm.annotation.kmeans import KMeansResult


class _FeatureCopies(TorchDispatchMode):
    """Storages of at least ``nbytes`` bytes that ops produce (views of small storages are not copies)."""

    def __init__(self, nbytes):
        super().__init__()
        self.nbytes, self.storages = nbytes, set()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.untyped_storage().nbytes() >= self.nbytes:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


class _Cache:
    def __init__(self, shards):
        self.shards = shards

    def load(self, shard, keys=None):
        return dict(self.shards[shard])


def test_the_features_are_normalised_in_their_float32_copy(monkeypatch):
    g = torch.Generator().manual_seed(0)
    shards = [{"cls": torch.randn(n, 16, generator=g).half(), "index": torch.arange(n)} for n in (30, 20)]
    seen = []

    def fake_kmeans(x, k, cfg, generator, distributed=False, log=None):
        seen.append(x)
        return KMeansResult(torch.zeros(k, x.shape[1]), torch.arange(len(x)) % k, 0.0, 0)

    monkeypatch.setattr(annotate_module, "kmeans_from_config", fake_kmeans)
    a = types.SimpleNamespace(seed=0, kmeans=KMeansConfig())
    with _FeatureCopies(50 * 16 * 4) as copies:
        labels, _, _ = annotate_module._cluster(_Cache(shards), 2, a, 3, torch.device("cpu"))
    assert len(copies.storages) == 1
    whole = torch.cat([s["cls"] for s in shards])
    assert torch.equal(seen[0], F.normalize(whole.float(), dim=1)) and torch.equal(labels, torch.arange(50) % 3)
