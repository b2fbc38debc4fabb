"""Fixtures of the annotation tests: a tiny random ViT saved in timm's layout, a small shapes dataset."""
import pathlib

import pytest
import torch

TINY_VIT = "vit_tiny_patch16_224"
TINY_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
DIM = TINY_KWARGS["embed_dim"]


def tiny_vit(seed: int = 0):
    import timm

    with torch.random.fork_rng(devices=[]):  # timm initialises from the global RNG; keep it out of other tests
        torch.manual_seed(seed)
        return timm.create_model(TINY_VIT, num_classes=0, **TINY_KWARGS).eval()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> pathlib.Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "tiny_vit.safetensors"
    save_file(tiny_vit().state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("shapes")


def shapes_data(cache: pathlib.Path, num_images: int = 48):
    from sgdm.data.config import DataConfig, ShapesConfig

    return DataConfig(dataset="shapes", size=32, num_workers=0,
                      shapes=ShapesConfig(num_images=num_images, num_val_images=8, image_size=32, cache_dir=cache))


def image_folder(root: pathlib.Path, good: int = 5, bad: bool = True) -> pathlib.Path:
    """``good`` tiny PNGs ``img_NN.png`` and, with ``bad``, ``img_bad.png``, a PNG cut short (sorted last)."""
    from tests.data import fixtures

    root.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        (root / f"img_{i:02d}.png").write_bytes(fixtures.encode(fixtures.sample_rgb(40, 32, seed=i), "PNG"))
    if bad:
        data = fixtures.encode(fixtures.sample_rgb(40, 32), "PNG")
        (root / "img_bad.png").write_bytes(data[: len(data) // 2])
    return root


def folder_data(root: pathlib.Path, **settings):
    """``data:`` for an image folder at the tiny ViT's 32 pixels."""
    from sgdm.config.core import from_dict
    from sgdm.data.config import DataConfig

    return from_dict(DataConfig, {"dataset": "image_folder", "root": str(root), "size": 32, "num_workers": 0,
                                  **settings}, "data")
