"""Adherence extracts the samples' features at the precision the store's features were extracted at
(its manifest's feature_precision), not at the device's default: f meets features like those it was
fitted on."""
import json

import pytest
import torch

from sgdm.cli.main import main
from tests.evaluation.helpers import make_run, record_annotation


def _keep_centroids(run_dir):
    from sgdm.annotation.centroids import ClusterF
    from sgdm.annotation.features import file_sha256
    from sgdm.config.schema import load_recorded

    store = load_recorded(run_dir / "config.yaml").annotation.store
    path = ClusterF(torch.randn(3, 32, generator=torch.Generator().manual_seed(0))).save(store / "centroids.safetensors")
    return dict(centroids=path.name, centroids_sha256=file_sha256(path))


@pytest.fixture
def extractions(monkeypatch):
    """The bf16 argument of every feature extraction of the samples (batches of eval.batch_size, 3)."""
    from sgdm.annotation import features

    real, seen = features.extract, []

    def extract(backbone, images, *args, bf16=None, **kwargs):
        if images.shape[0] == 3:  # the samples, not check_feature_dim's one blank image
            seen.append(bf16)
        return real(backbone, images, *args, bf16=bf16, **kwargs)

    monkeypatch.setattr(features, "extract", extract)
    return seen


@pytest.mark.parametrize("kind", ["label", "mask"])
def test_samples_are_extracted_at_the_stores_precision(tmp_path, extractions, kind):
    run_dir = make_run(tmp_path, kind)
    record_annotation(run_dir, params={}, feature_precision="bf16",  # the run's own annotation.precision is auto
                      **(_keep_centroids(run_dir) if kind == "label" else {}))
    assert main(["eval", str(run_dir), "--metrics", "adherence", "--n", "3"]) == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert ("cluster_adherence" if kind == "label" else "mask_miou") in results["results"][0]
    assert extractions and all(bf16 is True for bf16 in extractions), extractions  # on the CPU too
    assert results["adherence_extractor"]["precision"] == "bf16"


def test_the_stores_precision_and_its_fallbacks(tmp_path):
    from sgdm.annotation.store import AnnotationStore
    from sgdm.evaluation.adherence import store_precision

    run_dir = make_run(tmp_path, "label")
    record_annotation(run_dir, params={"precision": "bf16"})  # an older store: its setting, not what it made
    store = AnnotationStore.open(tmp_path / "store-label")
    assert store_precision(store, "auto") == "bf16"
    record_annotation(run_dir, params={"precision": "auto"}, feature_precision="fp32")
    assert store_precision(AnnotationStore.open(store.path), "bf16") == "fp32"
    assert store_precision(None, "bf16") == "bf16"


def test_a_fp32_store_is_scored_without_autocast_on_cuda(monkeypatch):
    """No GPU needed: the extractor's device is only named. The old code ran CUDA under bf16 autocast."""
    from types import SimpleNamespace

    from sgdm.annotation import features
    from sgdm.evaluation import adherence

    seen = []
    monkeypatch.setattr(features, "extract", lambda backbone, images, **kw: seen.append(kw.get("bf16")) or
                        SimpleNamespace(cls=torch.zeros(len(images), 2)))
    space = SimpleNamespace(backbone=None, device=torch.device("cuda"))

    class _Images(torch.Tensor):  # stays on the CPU when sent to the named device
        def to(self, *args, **kwargs):
            return self

    images = torch.zeros(2, 3, 4, 4).as_subclass(_Images)
    f = SimpleNamespace(num_classes=2, assign=lambda cls: torch.zeros(len(cls), dtype=torch.long))
    adherence.cluster_adherence(space, images, torch.zeros(2, dtype=torch.long), f, precision="fp32")
    adherence.cluster_adherence(space, images, torch.zeros(2, dtype=torch.long), f, precision="auto")
    assert seen == [False, True]
