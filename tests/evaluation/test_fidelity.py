"""torch-fidelity plumbing with a random-weight Inception saved to a local file."""
import pytest
import torch

from sgdm.evaluation.fidelity import UInt8Images, check_inception_weights, inception_metrics


def _images(n, generator, offset=0):
    return (torch.rand(n, 3, 32, 32, generator=generator) * 200 + offset).to(torch.uint8)


def test_inception_metrics_with_local_weights_and_cached_reference(inception_weights, tmp_path, generator):
    reference = UInt8Images(_images(10, generator))
    generated = _images(8, generator, offset=50)
    out = inception_metrics(
        generated, reference, "unit", weights_path=inception_weights, cache_dir=tmp_path, kid_subsets=5, batch_size=8
    )
    assert set(out) == {"fid", "is_mean", "is_std", "kid_mean", "kid_std"}
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    assert out["fid"] >= 0 and out["is_mean"] >= 1.0 - 1e-6
    cached = list(tmp_path.iterdir())
    assert cached and all("sgdm-unit-" in p.name for p in cached)
    again = inception_metrics(
        generated, reference, "unit", metrics=("fid",), weights_path=inception_weights, cache_dir=tmp_path, batch_size=8
    )
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-6)


def test_missing_inception_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception-weights: file .*nope.pth does not exist"):
        check_inception_weights(tmp_path / "nope.pth")


def test_offline_without_weights_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError, match="--inception-weights PATH"):
        inception_metrics(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), UInt8Images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)), "x")


def test_bad_generated_images_are_named():
    with pytest.raises(ValueError, match="images: expected uint8"):
        UInt8Images(torch.zeros(2, 3, 8, 8))
