"""AnnotationStore.matches_digest: a digest recorded earlier names the store's annotations even after a later
annotate added manifest keys (centroids, file sizes), and nothing else."""
import json

import torch

from sgdm.annotation.store import MANIFEST, AnnotationStore, write_store


def _store(tmp_path):
    ids = [f"img{i}" for i in range(5)]
    return write_store(tmp_path / "store", ids, {"cluster": torch.tensor([0, 1, 2, 0, 1])}, granularity="label",
                       num_classes=3)


def _rewrite(store, manifest):
    (store.path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return AnnotationStore.open(store.path)


def test_the_digest_itself_matches(tmp_path):
    store = _store(tmp_path)
    assert store.matches_digest(store.content_digest())
    assert not store.matches_digest(None) and not store.matches_digest("0" * 64)


def test_each_set_of_added_keys_is_looked_through(tmp_path):
    store = _store(tmp_path)
    before = store.content_digest()
    base = store.manifest
    centroids = {"centroids": "centroids.safetensors", "centroids_sha256": "a" * 64}
    sizes = {"files_sha256": "b" * 64, "file_sizes": [[1], [2], [3], [4], [5]]}
    for added in (centroids, sizes, {**centroids, **sizes}):
        grown = _rewrite(store, {**base, **added})
        assert grown.content_digest() != before
        assert grown.matches_digest(before), sorted(added)
    # a digest taken with the centroids already there matches a store that also gained file sizes
    with_centroids = _rewrite(store, {**base, **centroids}).content_digest()
    assert _rewrite(store, {**base, **centroids, **sizes}).matches_digest(with_centroids)


def test_other_changes_do_not_match(tmp_path):
    store = _store(tmp_path)
    before = store.content_digest()
    grown = {**store.manifest, "centroids": "centroids.safetensors", "centroids_sha256": "a" * 64}
    assert not _rewrite(store, {**grown, "method": "other"}).matches_digest(before)
    # other labels in the shard, same manifest keys added
    relabelled = write_store(store.path, store.ids, {"cluster": torch.tensor([1, 1, 2, 0, 1])}, granularity="label",
                             num_classes=3)
    assert not _rewrite(relabelled, {**relabelled.manifest, **{k: grown[k] for k in ("centroids", "centroids_sha256")}}) \
        .matches_digest(before)
