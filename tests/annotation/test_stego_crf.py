"""annotation.stego.crf: the segmenter's dense-CRF refinement (config, Segmenter.assign, save/load)."""
import json

import pytest
import torch
import torch.nn.functional as F

from sgdm.annotation.config import AnnotationConfig, CRFConfig
from sgdm.annotation.kmeans import assign
from sgdm.annotation.stego import Segmenter, upsample_codes
from sgdm.config.core import ConfigError, from_dict

CENTROIDS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def noisy_halves(side=8, image_side=16, seed=0):
    """Patch features ``[1, side, side, 2]`` whose nearest centroid is class 0 on the left half and 1
    on the right, except ~15% of cells flipped narrowly to the other class, and their image
    ``[1, 3, image_side, image_side]`` in [-1, 1]: red left half, blue right half (uniform colours)."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(side, side, dtype=torch.long)
    truth[:, side // 2 :] = 1
    flipped = torch.rand(side, side, generator=g) < 0.15
    noisy = torch.where(flipped, 1 - truth, truth)
    near, far = torch.where(flipped, 0.55, 0.8), torch.where(flipped, 0.45, 0.4)  # flipped: a narrow margin
    feats = torch.where(noisy[..., None] == 0, torch.stack([near, far], -1), torch.stack([far, near], -1))
    image = -torch.ones(1, 3, image_side, image_side)
    image[0, 0, :, : image_side // 2] = 1.0
    image[0, 2, :, image_side // 2 :] = 1.0
    return feats[None], image, truth, noisy


def test_crf_off_is_the_nearest_centroid_bit_for_bit_and_ignores_images():
    patches = torch.randn(5, 3, 3, 6, generator=torch.Generator().manual_seed(0))
    centroids = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    # the maps before the option: upsampled codes, nearest centroid (kmeans.assign), in one step
    expected = assign(upsample_codes(patches.permute(0, 3, 1, 2), (7, 7)).reshape(-1, 6), centroids)[0]
    expected = expected.reshape(5, 7, 7).to(torch.uint8)
    for crf in (None, CRFConfig(), CRFConfig(enabled=False, alpha=9.0)):
        segmenter = Segmenter(centroids, mask_size=7, crf=crf)
        assert segmenter.crf is None
        assert torch.equal(segmenter.assign(patches), expected)
        assert torch.equal(segmenter.assign(patches, images=torch.zeros(5, 3, 32, 32)), expected)


def test_crf_cleans_noisy_cells_inside_uniform_colour_regions():
    patches, image, truth, noisy = noisy_halves()
    plain = Segmenter(CENTROIDS).assign(patches)[0]
    assert torch.equal(plain.long(), noisy) and (noisy != truth).sum() >= 5
    refined = Segmenter(CENTROIDS, crf=CRFConfig(enabled=True)).assign(patches, images=image)[0]
    assert refined.shape == (8, 8) and refined.dtype == torch.uint8
    assert torch.equal(refined.long(), truth)  # every flipped cell back; the colour edge stays the boundary
    # a lazily indexed source (slices give tensors) reads the same images
    lazy = type("Source", (), {"__len__": lambda self: 1, "__getitem__": lambda self, i: image[i]})()
    assert torch.equal(Segmenter(CENTROIDS, crf=CRFConfig(enabled=True)).assign(patches, images=lazy)[0], refined)
    # no pairwise weight: the probe's argmax, the noisy map
    off = CRFConfig(enabled=True, pos_weight=0.0, bi_weight=0.0)
    assert torch.equal(Segmenter(CENTROIDS, crf=off).assign(patches, images=image)[0].long(), noisy)


def test_crf_needs_the_images_and_names_them():
    patches, image, _, _ = noisy_halves()
    segmenter = Segmenter(CENTROIDS, crf=CRFConfig(enabled=True))
    with pytest.raises(ValueError, match="images is required"):
        segmenter.assign(patches)
    with pytest.raises(ValueError, match="images holds 2 images for 1 patch maps"):
        segmenter.assign(patches, images=image.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match=r"images: expected \[1, 3, H, W\]"):
        segmenter.assign(patches, images=image[:, :1])
    with pytest.raises(ValueError, match=r"images: expected values in \[-1, 1\]"):
        segmenter.assign(patches, images=(image + 1) * 127.5)


def test_save_load_keeps_the_crf_settings_and_old_files_load_with_crf_off(tmp_path):
    from sgdm.annotation.store import save_tensors_atomic

    crf = CRFConfig(enabled=True, iterations=3, bi_rgb_std=7.5, alpha=4.0)
    loaded = Segmenter.load(Segmenter(CENTROIDS, mask_size=16, crf=crf).save(tmp_path / "on.safetensors"))
    assert loaded.crf == crf and loaded.mask_size == 16
    assert Segmenter.load(Segmenter(CENTROIDS, crf=CRFConfig()).save(tmp_path / "off.safetensors")).crf is None
    save_tensors_atomic(tmp_path / "old.safetensors", {"centroids": CENTROIDS}, {"mask_size": "16"})  # before crf
    assert Segmenter.load(tmp_path / "old.safetensors").crf is None
    save_tensors_atomic(tmp_path / "bad.safetensors", {"centroids": CENTROIDS},
                        {"crf": json.dumps({"enabled": True, "alpha": -1.0})})
    with pytest.raises(ValueError, match=r"bad.safetensors: metadata crf.alpha: must be a finite number > 0"):
        Segmenter.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("key, value, message", [
    ("iterations", -1, "must be an integer >= 0"),
    ("bi_weight", -0.5, "must be a finite number >= 0"),
    ("bi_rgb_std", 0.0, "must be a finite number > 0"),
    ("pos_xy_std", float("inf"), "must be a finite number > 0"),
    ("alpha", float("nan"), "must be a finite number > 0"),
    ("enabeld", True, "unknown key"),
    ("method", "fast", "must be 'exact' or 'lattice'"),
])
def test_config_errors_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=rf"^annotation\.stego\.crf\.{key}: {message}"):
        from_dict(AnnotationConfig, {"stego": {"crf": {key: value}}}, "annotation")
    assert from_dict(AnnotationConfig, {}, "annotation").stego.crf == CRFConfig(enabled=False)


def test_kernel_widths_are_in_pixels_of_the_image():
    # the same scene at a 4x coarser grid: a pixel-sized position kernel shrinks to a quarter cell
    # and cannot reach a neighbour, so nothing is cleaned where the bilateral term is off
    patches, image, truth, noisy = noisy_halves(side=8, image_side=32)
    crf = CRFConfig(enabled=True, bi_weight=0.0, pos_weight=3.0, pos_xy_std=1.0)
    assert torch.equal(Segmenter(CENTROIDS, crf=crf).assign(patches, images=image)[0].long(), noisy)
    wide = CRFConfig(enabled=True, bi_weight=0.0, pos_weight=3.0, pos_xy_std=4.0)  # one cell at 8 / 32
    assert (Segmenter(CENTROIDS, crf=wide).assign(patches, images=image)[0].long() != truth).sum() < (noisy != truth).sum()


def test_a_segmenter_or_store_made_before_crf_normalization_keeps_raw_sums(tmp_path):
    """CRF settings recorded without ``normalization`` were made with raw message sums: a segmenter file
    loads with ``none`` (adherence refines samples as its masks were refined), and such a store
    differs from a config that asks for the default ``symmetric``."""
    import dataclasses

    from sgdm.annotation.store import AnnotationStore, save_tensors_atomic, write_store
    from sgdm.config.core import to_dict

    old_crf = {k: v for k, v in to_dict(CRFConfig(enabled=True)).items() if k != "normalization"}
    save_tensors_atomic(tmp_path / "old_crf.safetensors", {"centroids": CENTROIDS}, {"crf": json.dumps(old_crf)})
    assert Segmenter.load(tmp_path / "old_crf.safetensors").crf.normalization == "none"
    new = Segmenter(CENTROIDS, crf=CRFConfig(enabled=True)).save(tmp_path / "new.safetensors")
    assert Segmenter.load(new).crf.normalization == "symmetric"

    made = AnnotationConfig(store=tmp_path / "s", granularity="mask", num_classes=2)
    made = dataclasses.replace(made, stego=dataclasses.replace(made.stego, crf=CRFConfig(enabled=True)))
    params = to_dict(made)
    del params["stego"]["crf"]["normalization"]
    write_store(made.store, ["a"], {"mask": torch.zeros(1, 4, 4, dtype=torch.uint8)}, granularity="mask",
                num_classes=2, extra={"params": params})
    store = AnnotationStore.open(made.store)
    assert store.settings_differ(made) == ["stego.crf.normalization"]
    raw = dataclasses.replace(made.stego.crf, normalization="none")
    assert store.settings_differ(dataclasses.replace(made, stego=dataclasses.replace(made.stego, crf=raw))) == []
    off = dataclasses.replace(made, stego=dataclasses.replace(made.stego, crf=CRFConfig()))
    params_off = to_dict(off)
    del params_off["stego"]["crf"]["normalization"]  # an old store without CRF: nothing to compare
    write_store(off.store, ["a"], {"mask": torch.zeros(1, 4, 4, dtype=torch.uint8)}, granularity="mask",
                num_classes=2, extra={"params": params_off})
    assert AnnotationStore.open(off.store).settings_differ(off) == []


def test_refine_without_a_crf_says_so():
    patches, image, _, _ = noisy_halves()
    codes = upsample_codes(patches.permute(0, 3, 1, 2), (8, 8))
    with pytest.raises(ValueError, match="Segmenter.refine: .*crf"):
        Segmenter(CENTROIDS).refine(codes, image)
