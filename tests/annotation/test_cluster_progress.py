"""k-means of the CLS features (ImageNet's 1.28M at K=1000: minutes) says what it does through ``log``: a line
before, one per Lloyd iteration, and the iterations, time and inertia after."""
import types

import torch

from sgdm.annotation import annotate as annotate_module
from sgdm.annotation.config import KMeansConfig


class _Cache:
    def __init__(self, shards):
        self.shards = shards

    def load(self, shard, keys=None):
        return dict(self.shards[shard])


def test_cluster_logs_its_iterations_and_inertia():
    g = torch.Generator().manual_seed(0)
    shards = [{"cls": torch.randn(n, 8, generator=g).half(), "index": torch.arange(n)} for n in (30, 20)]
    messages = []
    a = types.SimpleNamespace(seed=0, kmeans=KMeansConfig(max_iter=5))
    _, inertia, _ = annotate_module._cluster(_Cache(shards), 2, a, 3, torch.device("cpu"), messages.append)
    assert messages[0] == "annotate: k-means of the CLS features into K=3 clusters (at most 5 iterations) ..."
    assert messages[1].startswith("kmeans: iteration 1: centroid shift")
    assert messages[-1].startswith("annotate: k-means done after ") and messages[-1].endswith(f"inertia {inertia:.6g}")
    assert len(messages) >= 3
