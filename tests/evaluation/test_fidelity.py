"""torch-fidelity wrapper: weights checks (the happy path runs in test_evaluate with a random-weight Inception)."""
import pytest
import torch

from sgdm.evaluation.fidelity import UInt8Images, check_inception_weights, inception_metrics


def test_missing_inception_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception-weights: file .*nope.pth does not exist"):
        check_inception_weights(tmp_path / "nope.pth")


def test_offline_without_weights_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError, match=r"--inception-weights PATH \(eval.inception_weights\): that file, or "
                                           r"pytorch-fid's pt_inception-2015-12-05-6726825d.pth"):
        inception_metrics(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), UInt8Images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)), "x")


def test_bad_generated_images_are_named():
    with pytest.raises(ValueError, match="images: expected uint8"):
        UInt8Images(torch.zeros(2, 3, 8, 8))
