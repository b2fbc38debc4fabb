"""label and box stores keep their f, the k-means centroids of the prepared CLS features, so that the same f can
assign generated images to the clusters that guided them."""
import pytest
import torch

from sgdm.annotation.annotate import annotate
from sgdm.annotation.centroids import ClusterF
from sgdm.annotation.store import AnnotationStore

from .conftest import TINY_KWARGS, TINY_VIT
from .test_annotate import config


@pytest.mark.parametrize("granularity, k", [("label", 6), ("box", 5)])
def test_store_keeps_the_centroids_that_made_its_clusters(tmp_path, tiny_weights, shapes_cache, granularity, k):
    from sgdm.annotation.features import extract, load_backbone
    from sgdm.data import build_dataset

    cfg = config(tmp_path, tiny_weights, shapes_cache)
    store = AnnotationStore.open(annotate(cfg, granularity, progress=False, log=lambda m: None).store)
    f = ClusterF.of_store(store)
    assert f is not None and f.num_classes == store.num_classes == k and f.dim == TINY_KWARGS["embed_dim"]
    assert store.manifest["centroids"] == "centroids.safetensors" and len(store.manifest["centroids_sha256"]) == 64
    data = build_dataset(cfg.data, train=False)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    cls = extract(load_backbone(TINY_VIT, tiny_weights, TINY_KWARGS), images, patches=False).cls
    # f applied to the images' features gives back the stored cluster ids (k-means stops when no label moves)
    assert torch.equal(f.assign(cls), store.tensor("cluster"))


def test_a_changed_missing_or_other_preprocessing_centroids_file_is_named(tmp_path, tiny_weights, shapes_cache):
    from sgdm.annotation.store import save_tensors_atomic

    store = AnnotationStore.open(annotate(config(tmp_path, tiny_weights, shapes_cache), "label", progress=False,
                                          log=lambda m: None).store)
    path = store.path / "centroids.safetensors"
    ClusterF(torch.ones(6, TINY_KWARGS["embed_dim"])).save(path)
    with pytest.raises(ValueError, match="centroids file centroids.safetensors is not the one its manifest records"):
        ClusterF.of_store(store)
    save_tensors_atomic(path, {"centroids": torch.ones(6, 4)}, {"preprocess": "cls,l2"})
    with pytest.raises(ValueError, match="preprocessing 'cls,l2', this sgdm applies 'cls,float16,l2'"):
        ClusterF.load(path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="centroids file centroids.safetensors is missing"):
        ClusterF.of_store(store)
    with pytest.raises(ValueError, match=r"CLS features of shape \(2, 3\), the centroids take \[N, 4\]"):
        ClusterF(torch.ones(2, 4)).assign(torch.ones(2, 3))
