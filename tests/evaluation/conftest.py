"""Shared fixtures: a random-weight Inception-v3 in torch-fidelity's file format."""
from unittest import mock

import pytest
import torch


def save_random_inception(path, seed=0):
    """A torch-fidelity ``inception-v3-compat`` state dict with random weights (plumbing tests only)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)  # the module's own init draws from the global RNG; confined to this helper
    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), mock.patch.object(
        fe, "load_state_dict_from_url", lambda *a, **k: {}
    ):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in model.modules():  # variance-preserving init, so 90 random layers do not shrink features to 0
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    return save_random_inception(tmp_path_factory.mktemp("inception") / "inception-random.pth")
