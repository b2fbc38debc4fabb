"""Patch features streamed from shards: same rows as the tensor, bounded reads, same masks."""
import pytest
import torch
from safetensors.torch import save_file

from sgdm.annotation.config import KMeansConfig, StegoConfig
from sgdm.annotation.patches import ShardPatches
from sgdm.annotation.stego import segment


def two_kind_patches(n=10, seed=0):
    """Left half of every image has feature a, right half feature b (as in test_stego)."""
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 1.0, 1.0
    noise = 0.05 * torch.randn(n, 4, 4, 8, generator=torch.Generator().manual_seed(seed))
    return (torch.cat([a.expand(n, 4, 2, 8), b.expand(n, 4, 2, 8)], dim=2) + noise).half()


def write_shards(tmp_path, patches, sizes):
    paths, start = [], 0
    for i, size in enumerate(sizes):
        path = tmp_path / f"features_{i:05d}.safetensors"
        tensors = {"index": torch.arange(start, start + size)}
        if size:
            tensors["patches"] = patches[start : start + size].contiguous()
        save_file(tensors, str(path))
        paths.append(path)
        start += size
    return paths


def test_rows_match_the_tensor_across_shards(tmp_path):
    patches = two_kind_patches()
    source = ShardPatches(write_shards(tmp_path, patches, [3, 0, 4, 3]))  # an empty shard holds no rows
    assert len(source) == 10 and source.shape == patches.shape
    index = torch.tensor([9, 0, 3, 2, 3, -1])
    assert torch.equal(source[index], patches[index])
    assert torch.equal(source[2:8], patches[2:8]) and source[5:5].shape[0] == 0
    with pytest.raises(IndexError, match="out of range"):
        source[torch.tensor([10])]


def test_refuses_shards_without_patches(tmp_path):
    save_file({"index": torch.arange(3)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="were features extracted for masks"):
        ShardPatches([tmp_path / "a.safetensors"])


class CountingSource:
    """Wraps a source and records how many images each read asked for."""

    def __init__(self, source):
        self.source, self.reads = source, []
        self.shape = source.shape

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        rows = self.source[index]
        self.reads.append(rows.shape[0])
        return rows


@pytest.mark.parametrize("method", ["stego", "kmeans"])
def test_segment_streams_batches_and_matches_in_memory(tmp_path, method):
    patches = two_kind_patches(12)
    cls = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    cfg = StegoConfig(method=method, dim=4, epochs=2, batch_size=5, knn=2, feature_samples=0, mask_size=0)
    source = CountingSource(ShardPatches(write_shards(tmp_path, patches, [5, 5, 2])))
    streamed = segment(source, cls, 2, cfg, KMeansConfig(), torch.Generator().manual_seed(0), fit_patches=40)
    in_memory = segment(patches, cls, 2, cfg, KMeansConfig(), torch.Generator().manual_seed(0), fit_patches=40)
    assert torch.equal(streamed, in_memory)
    assert max(source.reads) <= cfg.batch_size  # never more than one batch of images in memory
    assert sum(source.reads) >= 12  # every image was assigned
    left, right = streamed[:, :, :2], streamed[:, :, 2:]
    assert left.unique().numel() == 1 and right.unique().numel() == 1 and left[0, 0, 0] != right[0, 0, 0]
