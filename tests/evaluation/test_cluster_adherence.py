"""Cluster adherence of label and box runs: samples are assigned to clusters by the store's own f (the nearest
k-means centroid of the prepared CLS feature) and compared with the clusters that guided them; a store without
centroids says how to get the score instead of leaving it out silently."""
import json

import pytest
import torch

from sgdm.annotation.centroids import ClusterF
from sgdm.cli.main import main
from tests.evaluation.helpers import make_run, record_annotation


class _Identity(torch.nn.Module):
    def forward_features(self, x):
        return x


def _mean_colour_space():
    """A stand-in extractor whose CLS feature is an image's mean colour in [0, 1] (a 'CNN' whose feature map
    is the image itself), so that a sample's cluster is set by the colour it is drawn in."""
    from types import SimpleNamespace

    from sgdm.annotation.features import Backbone

    backbone = Backbone(_Identity(), "mean-colour", (4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False, 0, "random")
    return SimpleNamespace(backbone=backbone, device=torch.device("cpu"))


def _solid(clusters):
    """Images [N, 3, 4, 4] in [-1, 1] coloured red, green or blue by cluster 0, 1 or 2."""
    colours = torch.eye(3)[torch.as_tensor(clusters)] * 2 - 1
    return colours[:, :, None, None].expand(-1, -1, 4, 4).contiguous()


def test_samples_of_their_cluster_score_high_and_mismatched_ones_low():
    from sgdm.evaluation.adherence import cluster_adherence

    f = ClusterF(torch.eye(3) * 0.9)  # centroids of unit vectors lie inside the sphere
    guided = torch.tensor([0, 1, 2, 0, 1, 2])
    space = _mean_colour_space()
    assert cluster_adherence(space, _solid(guided), guided, f, batch_size=4) == \
        {"cluster_adherence": 1.0, "cluster_adherence_chance": pytest.approx(2 / 6)}
    assert cluster_adherence(space, _solid(guided.roll(1)), guided, f)["cluster_adherence"] == 0.0
    half = torch.tensor([0, 1, 2, 1, 2, 0])  # the last three drawn in another cluster's colour
    assert cluster_adherence(space, _solid(half), guided, f)["cluster_adherence"] == pytest.approx(0.5)
    # the chance level is the most common guiding cluster's share: a model drawing cluster 0 always scores it
    unbalanced = torch.tensor([0, 0, 0, 0, 1, 2])
    out = cluster_adherence(space, _solid(torch.zeros(6, dtype=torch.long)), unbalanced, f)
    assert out["cluster_adherence"] == out["cluster_adherence_chance"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match=r"clusters: ids must lie in \[0, 3\)"):
        cluster_adherence(space, _solid(guided), guided + 1, f)


def _keep_centroids(run_dir, num_classes=3, dim=32):
    """Save k-means centroids into the run's store and name them in its manifest, as annotate does."""
    from sgdm.annotation.features import file_sha256
    from sgdm.config.schema import load_recorded

    store = load_recorded(run_dir / "config.yaml").annotation.store
    path = ClusterF(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0))).save(
        store / "centroids.safetensors")
    record_annotation(run_dir, centroids=path.name, centroids_sha256=file_sha256(path))


@pytest.mark.parametrize("kind", ["label", "box"])
def test_runs_whose_store_kept_its_centroids_report_cluster_adherence(tmp_path, kind):
    run_dir = make_run(tmp_path, kind)
    _keep_centroids(run_dir)
    assert main(["eval", str(run_dir), "--metrics", "adherence", "--n", "6"]) == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    (row,) = results["results"]
    assert 0 <= row["cluster_adherence"] <= 1 and 1 / 3 <= row["cluster_adherence_chance"] <= 1
    assert ("box_iou" in row) == (kind == "box") and results["notes"] == []
    assert results["adherence_extractor"]["input_size"] == [16, 16]


def test_a_label_store_without_centroids_says_how_to_get_the_score(tmp_path, capsys):
    run_dir = make_run(tmp_path, "label")  # written as an older sgdm wrote it: no centroids
    assert main(["eval", str(run_dir), "--metrics", "fd,adherence", "--n", "3"]) == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert "cluster_adherence" not in results["results"][0]
    (note,) = results["notes"]
    assert note.startswith("no cluster adherence: the annotation store") and "run `sgdm-ldm annotate`" in note
    assert f"eval: warning: {note}" in capsys.readouterr().err
    assert f"- {note}" in (run_dir / "eval" / "results.md").read_text()
    # adherence alone would measure nothing: refused before sampling, saying the same
    assert main(["eval", str(run_dir), "--metrics", "adherence"]) == 2
    err = capsys.readouterr().err
    assert "config error: eval.metrics: adherence alone of a label run measures nothing here" in err
    assert "did not keep its k-means centroids" in err and "run `sgdm-ldm annotate`" in err


def test_a_box_store_without_centroids_scores_its_boxes_and_notes_the_clusters(tmp_path):
    run_dir = make_run(tmp_path, "box")
    assert main(["eval", str(run_dir), "--metrics", "adherence", "--n", "3"]) == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert "box_iou" in results["results"][0] and "cluster_adherence" not in results["results"][0]
    assert "did not keep its k-means centroids" in results["notes"][0]


@pytest.fixture
def no_sampling(monkeypatch):
    import sgdm.evaluation.evaluate as evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("the evaluation sampled before refusing the store")

    monkeypatch.setattr(evaluate, "generate", refuse)


@pytest.mark.parametrize("num_classes, dim, message", [
    (2, 32, "its centroids file centroids.safetensors has 2 clusters, its manifest K=3"),
    (3, 16, "annotation.backbone_kwargs: adherence's extractor (vit_tiny_patch16_224) gives 32-wide CLS features, "
            "the k-means centroids"),
])
def test_centroids_of_another_k_or_feature_width_stop_before_sampling(tmp_path, capsys, no_sampling,
                                                                       num_classes, dim, message):
    run_dir = make_run(tmp_path, "label")
    _keep_centroids(run_dir, num_classes, dim)
    assert main(["eval", str(run_dir), "--metrics", "adherence"]) in (1, 2)
    assert message in capsys.readouterr().err


def test_a_store_that_only_gained_its_centroids_is_the_one_the_run_was_trained_on(tmp_path):
    # re-running annotate with the same settings on an older sgdm's store writes the same clusters and adds the
    # centroids: the run's record of the store (annotation_store.json) still matches; other clusters do not
    from sgdm.annotation.store import AnnotationStore, write_store
    from sgdm.config.core import ConfigError
    from sgdm.config.schema import load_recorded
    from sgdm.evaluation.store_checks import check_store

    run_dir = make_run(tmp_path, "label")
    cfg = load_recorded(run_dir / "config.yaml")
    store = AnnotationStore.open(cfg.annotation.store)
    ids, clusters = list(store.ids), store.tensor("cluster")
    (run_dir / "annotation_store.json").write_text(json.dumps({"sha256": store.content_digest()}))
    f = ClusterF(torch.randn(3, 32, generator=torch.Generator().manual_seed(0))).save(store.path / "centroids.safetensors")
    from sgdm.annotation.features import file_sha256

    extra = {"centroids": f.name, "centroids_sha256": file_sha256(f)}
    write_store(store.path, ids, {"cluster": clusters}, granularity="label", num_classes=3, extra=extra)
    check_store(cfg, ["adherence"], run_dir)
    # annotate records the images' file sizes since the same version
    write_store(store.path, ids, {"cluster": clusters}, granularity="label", num_classes=3, extra=extra,
                sizes=[[100 + i] for i in range(len(ids))])
    check_store(cfg, ["adherence"], run_dir)
    write_store(store.path, ids, {"cluster": (clusters + 1) % 3}, granularity="label", num_classes=3, extra=extra)
    with pytest.raises(ConfigError, match="holds other annotations than run"):
        check_store(cfg, ["adherence"], run_dir)
