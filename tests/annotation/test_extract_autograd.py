"""Feature extraction records no autograd graph: the backbone is frozen and nothing trains through
its features, so a graph would only hold every activation of the batch in memory."""
import torch

from sgdm.annotation.features import extract, load_backbone

from .conftest import TINY_KWARGS, TINY_VIT


def test_extract_runs_the_backbone_without_autograd():
    backbone = load_backbone(TINY_VIT, kwargs=TINY_KWARGS, random_init=True)
    seen = []
    backbone.model.patch_embed.register_forward_pre_hook(lambda module, args: seen.append(torch.is_grad_enabled()))
    images = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_()
    feats = extract(backbone, images, keys=True)
    assert seen and not any(seen)
    assert not feats.cls.requires_grad and not feats.patches.requires_grad and not feats.keys.requires_grad
