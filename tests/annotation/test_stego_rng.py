"""The STEGO head's initialisation draws from the caller's generator and leaves every global RNG alone."""
import torch

from sgdm.annotation.config import StegoConfig
from sgdm.annotation.stego import train_head


def test_train_head_does_not_seed_the_global_cuda_generators(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    patches = torch.randn(4, 2, 2, 8, generator=torch.Generator().manual_seed(0))
    cls = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    cfg = StegoConfig(dim=4, epochs=1, batch_size=2, knn=1, feature_samples=0)
    before = torch.random.get_rng_state()
    a = train_head(patches, cls, cfg, torch.Generator().manual_seed(3))
    b = train_head(patches, cls, cfg, torch.Generator().manual_seed(3))
    assert calls == []  # torch.manual_seed would reseed every CUDA device's default generator too
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_loading_a_backbone_leaves_the_global_generator_where_it_was(tiny_weights):
    from sgdm.annotation.features import load_backbone

    from .conftest import TINY_KWARGS, TINY_VIT

    before = torch.random.get_rng_state()
    load_backbone(TINY_VIT, tiny_weights, TINY_KWARGS)  # timm's random init, then the file's weights
    assert torch.equal(torch.random.get_rng_state(), before)
