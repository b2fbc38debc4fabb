"""torch.distributed (gloo on CPU, two spawned ranks, one spawn for every check since each
process start costs seconds):

* k-means: two ranks holding halves of the data take the same steps as one process holding
  all of it (centroid sums, counts and empty-cluster reseeding are all-reduced / gathered);
* annotate: ranks split the feature shards and the k-means; rank 0 writes one complete store;
* STEGO: the head trains data-parallel (averaged gradients): two ranks with batches of 2 take the
  same step as one process with a batch of 4, and the mask pipeline writes one complete store.
"""
import os
import pathlib

import pytest
import torch
import torch.multiprocessing as mp

from sgdm.annotation.config import StegoConfig
from sgdm.annotation.kmeans import _lloyd, kmeans
from sgdm.annotation.stego import train_head
from sgdm.annotation.store import AnnotationStore
from tests.launchers import leave_process

from .conftest import shapes_data
from .test_patches import two_kind_patches

# pointwise=False: with STEGO's pointwise centring the batch-global mean couples the images of a
# batch, so only without it is the loss of a batch of 4 the mean of two batches of 2
HEAD_CFG = dict(dim=4, epochs=1, knn=1, feature_samples=0, neg_inter_weight=0.0, pointwise=False)


def head_data():
    return two_kind_patches(4).float(), torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def blob_data():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 5, generator=g) * 4
    x = centres[torch.randint(6, (400,), generator=g)] + torch.randn(400, 5, generator=g)
    start = torch.cat([x[:5], torch.full((1, 5), 100.0)])  # the far centre starts empty: reseeded
    return x, start


def worker(rank, world, init_file, out_dir, weights, cache):
    import torch.distributed as dist

    from sgdm.annotation.annotate import annotate

    from .test_annotate import config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, start = blob_data()
        mine = x[rank::world]
        centroids, labels, _, n_iter = _lloyd(mine, mine.pow(2).sum(1), start.clone(), 20, 0.0, 1 << 20, True)
        full = kmeans(mine, 6, generator=torch.Generator().manual_seed(1), distributed=True)
        cfg = config(pathlib.Path(out_dir), weights, pathlib.Path(cache), num_images=40, shard_size=8)
        result = annotate(cfg, "box", evaluate=True, progress=False, log=lambda m: None)
        patches, cls = head_data()
        head = train_head(patches, cls, StegoConfig(batch_size=2, **HEAD_CFG), torch.Generator().manual_seed(0),
                          distributed=True)
        mask_cfg = config(pathlib.Path(out_dir) / "mask", weights, pathlib.Path(cache), num_images=40, shard_size=8,
                          num_classes=3)
        masks = annotate(mask_cfg, "mask", progress=False, log=lambda m: None)
        crf_cfg = config(pathlib.Path(out_dir) / "crf", weights, pathlib.Path(cache), num_images=40, shard_size=8,
                         num_classes=3, stego={"method": "kmeans", "mask_size": 0, "crf": {"enabled": True}})
        annotate(crf_cfg, "mask", progress=False, log=lambda m: None)
        torch.save({"centroids": centroids, "labels": labels, "n_iter": n_iter, "full": full,
                    "num_images": result.num_images, "head": head.state_dict(), "mask_images": masks.num_images},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave_process()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_weights, shapes_cache):
    out = tmp_path_factory.mktemp("distributed")
    # both ranks live on this machine: keep gloo on the loopback device instead of whatever
    # interface the host name resolves to (one CI run aborted both ranks during set-up)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(2, str(out / "init"), str(out), str(tiny_weights), str(shapes_cache)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_lloyd_steps_equal_one_process(ranks):
    x, start = blob_data()
    centroids, labels, _, n_iter = _lloyd(x, x.pow(2).sum(1), start.clone(), 20, 0.0, 1 << 20, False)
    for r, got in enumerate(ranks[1]):
        torch.testing.assert_close(got["centroids"], centroids, rtol=0, atol=1e-5)
        assert torch.equal(got["labels"], labels[r::2]) and got["n_iter"] == n_iter


@pytest.mark.slow
def test_kmeans_same_centroids_on_every_rank(ranks):
    x, _ = blob_data()
    a, b = ranks[1][0]["full"], ranks[1][1]["full"]
    assert torch.equal(a.centroids, b.centroids) and a.inertia == b.inertia
    direct = sum(float((x[r::2].double() - a.centroids.double()[res.labels]).pow(2).sum()) for r, res in enumerate((a, b)))
    assert abs(a.inertia - direct) <= 1e-4 * direct  # inertia is summed over the ranks
    assert a.inertia <= kmeans(x, 6, generator=torch.Generator().manual_seed(1)).inertia * 1.01


@pytest.mark.slow
def test_annotate_writes_one_complete_store(ranks, shapes_cache):
    from sgdm.data import build_dataset

    out, results = ranks
    assert results[0]["num_images"] == 40 and results[1]["num_images"] == 0  # rank 0 writes
    store = AnnotationStore.open(out / "store")
    assert store.ids == build_dataset(shapes_data(shapes_cache, 40), train=False).ids
    shards = sorted(p.name for p in (out / "store" / "work").glob("features_*"))
    assert shards == [f"features_{i:05d}.safetensors" for i in range(5)]
    assert int(store.tensor("cluster").max()) < 5 and "corloc" in store.manifest["metrics"]


@pytest.mark.slow
def test_stego_head_trains_data_parallel(ranks):
    patches, cls = head_data()
    single = train_head(patches, cls, StegoConfig(batch_size=4, **HEAD_CFG), torch.Generator().manual_seed(0))
    initial = train_head(patches, cls, StegoConfig(batch_size=4, **{**HEAD_CFG, "epochs": 0}), torch.Generator().manual_seed(0))
    a, b = ranks[1][0]["head"], ranks[1][1]["head"]
    for name, value in single.state_dict().items():
        assert torch.equal(a[name], b[name])  # averaged gradients keep the ranks' heads identical
        torch.testing.assert_close(a[name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, initial.state_dict()[k]) for k, v in single.state_dict().items())


@pytest.mark.slow
def test_annotate_masks_with_two_ranks(ranks):
    out, results = ranks
    assert results[0]["mask_images"] == 40 and results[1]["mask_images"] == 0
    store = AnnotationStore.open(out / "mask" / "store")
    masks = store.tensor("mask")
    assert masks.shape == (40, 32, 32) and int(masks.max()) < 3 and store.manifest["method"] == "stego"  # mask_size 64 -> the 32-px image


@pytest.mark.slow
def test_crf_masks_with_two_ranks_read_each_ranks_images(ranks, shapes_cache):
    # each rank refines its share of the rows on the images it reads again; rank 0's store holds
    # every map as one process would draw it from the cached features and the dataset's images
    from sgdm.annotation.patches import ShardPatches
    from sgdm.data import build_dataset

    out, _ = ranks
    store = AnnotationStore.open(out / "crf" / "store")
    data = build_dataset(shapes_data(shapes_cache, 40), train=False)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    patches = ShardPatches(sorted((store.path / "work").glob("features_*.safetensors")))
    segmenter = store.segmenter()
    assert segmenter.crf is not None and store.manifest["crf"]["enabled"] is True
    assert torch.equal(store.tensor("mask"), segmenter.assign(patches, images=images))
