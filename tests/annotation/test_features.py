import re
import time

import pytest
import torch

from sgdm.annotation.features import BackboneError, extract, load_backbone

from .conftest import DIM, TINY_KWARGS, TINY_VIT, tiny_vit


def images(n=2, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_local_timm_weights_and_outputs(tiny_weights):
    backbone = load_backbone(TINY_VIT, tiny_weights, TINY_KWARGS)
    reference = tiny_vit()
    for name, value in reference.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[name], value), name
    assert len(backbone.weights_id) == 64  # sha256 of the file
    feats = extract(backbone, images(), keys=True)
    assert feats.cls.shape == (2, DIM) and feats.patches.shape == (2, 4, 4, DIM) and feats.keys.shape == (2, 4, 4, DIM)


def test_keys_are_the_last_blocks_attention_keys(tiny_weights):
    backbone = load_backbone(TINY_VIT, tiny_weights, TINY_KWARGS)
    model = backbone.model
    from sgdm.annotation.features import preprocess

    x = preprocess(backbone, images())
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(x))
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        last = model.blocks[-1]
        qkv = last.attn.qkv(last.norm1(tokens))  # [B, T, 3 * D]: q | k | v
        expected = qkv[:, 1:, DIM : 2 * DIM].reshape(2, 4, 4, DIM)
    torch.testing.assert_close(extract(backbone, images(), keys=True).keys, expected)


def test_preprocess_resizes_and_normalises(tiny_weights):
    from sgdm.annotation.features import preprocess

    backbone = load_backbone(TINY_VIT, tiny_weights, TINY_KWARGS)
    x = preprocess(backbone, torch.zeros(1, 3, 50, 50))  # mid-grey
    assert x.shape == (1, 3, 32, 32)
    mean, std = torch.tensor(backbone.mean), torch.tensor(backbone.std)
    torch.testing.assert_close(x[0, :, 0, 0], (0.5 - mean) / std)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        preprocess(backbone, torch.zeros(3, 32, 32))


def test_original_dino_checkpoint_layout(tmp_path):
    """DINO's checkpoint.pth: teacher/student dicts with 'backbone.' prefixes and a projection head."""
    reference = tiny_vit(seed=1)
    teacher = {f"backbone.{k}": v for k, v in reference.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.zeros(8, DIM)
    teacher["head.last_layer.weight_g"] = torch.ones(16, 1)
    student = {f"module.{k}": torch.zeros_like(v) for k, v in teacher.items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": student, "teacher": teacher, "epoch": 3}, path)
    backbone = load_backbone(TINY_VIT, path, TINY_KWARGS)
    for name, value in reference.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[name], value), name
    # plain backbone weights file (DINO's released *_pretrain.pth): same keys as timm
    torch.save(reference.state_dict(), tmp_path / "plain.pth")
    plain = load_backbone(TINY_VIT, tmp_path / "plain.pth", TINY_KWARGS)
    torch.testing.assert_close(extract(plain, images()).cls, extract(backbone, images()).cls)


def test_cnn_backbone(tmp_path):
    import timm
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("resnet18", num_classes=0)
    save_file(model.state_dict(), str(tmp_path / "r18.safetensors"))
    backbone = load_backbone("resnet18", tmp_path / "r18.safetensors", image_size=64)
    feats = extract(backbone, images(size=48), keys=True)
    assert feats.cls.shape == (2, 512) and feats.patches.shape == (2, 2, 2, 512)
    torch.testing.assert_close(feats.cls, feats.patches.mean((1, 2)))


def test_unknown_backbone_suggests_names():
    with pytest.raises(BackboneError, match="unknown backbone 'vit_smal_patch16_224.dino'.*vit_small_patch16_224"):
        load_backbone("vit_smal_patch16_224.dino")


def test_missing_weights_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(BackboneError, match="no local weights.*offline.*annotation.weights"):
        load_backbone(TINY_VIT, None, TINY_KWARGS)
    assert time.monotonic() - start < 20  # never the ~47 s hub timeout


def test_no_route_to_the_hub_loads_only_a_cached_copy(monkeypatch, tmp_path):
    """Without HF_HUB_OFFLINE but with no route to the hub, nothing is downloaded (a network that
    drops packets would make that wait out its timeouts): a copy in the local hub cache loads,
    and without one the error comes at once."""
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    import sgdm.annotation.features as features

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(features, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    create = timm.create_model
    calls = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k) or create(*a, **k))
    with pytest.raises(BackboneError, match="no local weights.*offline"):
        load_backbone(TINY_VIT, None, TINY_KWARGS)
    assert not calls  # no download was attempted
    # the hub cache's layout: models--<org>--<name>/refs/main -> snapshots/<revision>/model.safetensors
    repo = timm.models.get_pretrained_cfg(TINY_VIT).hf_hub_id
    root = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("abc123")
    (root / "snapshots" / "abc123").mkdir(parents=True)
    reference = tiny_vit()
    save_file(reference.state_dict(), str(root / "snapshots" / "abc123" / "model.safetensors"))
    backbone = load_backbone(TINY_VIT, None, TINY_KWARGS)
    assert calls[-1]["pretrained_cfg_overlay"]["file"].endswith("model.safetensors")
    for name, value in reference.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[name], value), name


def test_bad_weights_files(tmp_path, tiny_weights):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(TINY_VIT, tmp_path / "missing.pth", TINY_KWARGS)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="junk.pth cannot be read"):
        load_backbone(TINY_VIT, tmp_path / "junk.pth", TINY_KWARGS)
    truncated = tmp_path / "truncated.safetensors"  # an interrupted copy: safetensors' bare error named no file
    truncated.write_bytes(tiny_weights.read_bytes()[:1000])
    with pytest.raises(BackboneError, match="truncated.safetensors cannot be read as safetensors"):
        load_backbone(TINY_VIT, truncated, TINY_KWARGS)
    with pytest.raises(BackboneError, match=f"does not match backbone {TINY_VIT}: missing.*annotation.backbone_kwargs"):
        load_backbone(TINY_VIT, tiny_weights, {**TINY_KWARGS, "depth": 3})
    with pytest.raises(BackboneError, match="bad annotation.backbone_kwargs"):
        load_backbone(TINY_VIT, tiny_weights, {"no_such_argument": 1})


def test_bad_kwargs_with_hub_weights_name_the_kwargs(monkeypatch, tmp_path):
    """Weights from the hub cache and a keyword the model does not take: the error names the kwargs,
    not the hub (which is not what failed)."""
    import sgdm.annotation.features as features

    monkeypatch.setattr(features, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(features, "cached_pretrained_file", lambda name: str(tmp_path / "model.safetensors"))
    with pytest.raises(BackboneError, match="bad annotation.backbone_kwargs"):
        load_backbone(TINY_VIT, None, {"no_such_argument": 1})


def test_weights_of_another_width_are_one_line(tiny_weights):
    """Weights whose shapes do not fit (a small encoder under a ViT-B name): one BackboneError naming the
    first tensor with both shapes, not load_state_dict's line per tensor."""
    with pytest.raises(BackboneError) as info:
        load_backbone(TINY_VIT, tiny_weights, {**TINY_KWARGS, "embed_dim": 32})
    message = str(info.value)
    assert "\n" not in message
    assert f"{tiny_weights} does not match backbone {TINY_VIT}: 'cls_token' has shape (1, 1, 64) in the file, " \
           "(1, 1, 32) in the model (and " in message
    assert "check annotation.backbone / annotation.backbone_kwargs" in message


def test_bf16_autocast_close_to_fp32(tiny_weights):
    backbone = load_backbone(TINY_VIT, tiny_weights, TINY_KWARGS)
    full = extract(backbone, images(), keys=True, bf16=False)
    half = extract(backbone, images(), keys=True, bf16=True)
    assert half.cls.dtype == torch.float32
    assert not torch.equal(full.cls, half.cls)  # autocast really ran in bfloat16
    torch.testing.assert_close(half.cls, full.cls, rtol=0.05, atol=0.05)
    torch.testing.assert_close(half.keys, full.keys, rtol=0.05, atol=0.05)


def test_patch_grid_must_tile_the_input():
    """A 36 px input at patch size 8 gives a 4 x 4 grid over 32 px: the boxes and masks made on it
    would be stretched over the whole image (up to 4 px off), so spatial features are refused."""
    backbone = load_backbone(TINY_VIT, kwargs={**TINY_KWARGS, "img_size": 36}, random_init=True)
    assert tuple(backbone.model.patch_embed.grid_size) == (4, 4)
    for flags in ({"keys": True, "patches": False}, {"patches": True}):
        with pytest.raises(BackboneError, match=r"input 36x36 is not a multiple of the patch size 8x8.*32 or 40"):
            extract(backbone, images(size=36), **flags)
    assert extract(backbone, images(size=36), patches=False).cls.shape == (2, DIM)  # CLS alone is fine
    # a hybrid (CNN-stem) ViT's grid is counted in feature-map cells, not pixels: 64 px -> a 2 x 2 grid
    hybrid = load_backbone("vit_tiny_r_s16_p8_224", kwargs={"img_size": 64, "depth": 1}, random_init=True)
    assert extract(hybrid, images(size=64)).patches.shape[1:3] == (2, 2)


@pytest.mark.parametrize("pool", ["avg", "map"])
def test_cls_of_a_vit_without_class_token_is_its_pooled_feature(pool):
    """Without a class token, out[:, 0] is the top-left patch token: clustering on it would group
    images by one corner patch. The image feature is the model's own pooling."""
    kwargs = {**TINY_KWARGS, "class_token": False, "global_pool": pool}
    backbone = load_backbone(TINY_VIT, kwargs=kwargs, random_init=True)
    assert backbone.num_prefix_tokens == 0
    feats = extract(backbone, images(), keys=True)
    from sgdm.annotation.features import preprocess

    with torch.no_grad():
        expected = backbone.model(preprocess(backbone, images()))  # num_classes=0: the pre-logits feature
    torch.testing.assert_close(feats.cls, expected)
    assert not torch.allclose(feats.cls, feats.patches[:, 0, 0])
    assert feats.patches.shape == (2, 4, 4, DIM) and feats.keys.shape == (2, 4, 4, DIM)


def test_cls_of_a_class_token_vit_is_its_cls_token(tiny_weights):
    backbone = load_backbone(TINY_VIT, tiny_weights, TINY_KWARGS)
    from sgdm.annotation.features import preprocess

    with torch.no_grad():
        tokens = backbone.model.forward_features(preprocess(backbone, images()))
    assert torch.equal(extract(backbone, images()).cls, tokens[:, 0])
    unpooled = load_backbone(TINY_VIT, tiny_weights, {**TINY_KWARGS, "global_pool": ""})
    assert torch.equal(extract(unpooled, images()).cls, tokens[:, 0])


def test_keys_of_a_backbone_that_bypasses_its_qkv_module():
    """BEiT applies qkv.weight with its own q/v biases (F.linear), so the forward hook never fires:
    a BackboneError that says so, not a bare KeyError."""
    backbone = load_backbone("beit_base_patch16_224", kwargs={**TINY_KWARGS, "depth": 1}, random_init=True)
    with pytest.raises(BackboneError, match="does not call its qkv projection.*features: tokens"):
        extract(backbone, images(), keys=True)
    assert extract(backbone, images()).patches.shape == (2, 4, 4, DIM)


def test_weights_of_another_vit_are_refused_and_described(tmp_path):
    """DINO weights of another ViT than annotation.backbone: timm's filter would resample a patch
    embedding of another size (ViT-S/8 weights loaded into a ViT-S/16 without a word); both that and a
    width mismatch name what the file holds and the settings that build it."""
    import timm

    with torch.random.fork_rng(devices=[]):
        small8 = timm.create_model("vit_small_patch8_224.dino", num_classes=0, img_size=32)
    torch.save(small8.state_dict(), tmp_path / "dino_deitsmall8_pretrain.pth")
    with pytest.raises(BackboneError, match=r"patch size is \(8, 8\), the backbone's \(16, 16\); .*embed_dim 384, "
                                            r"patch size 8, depth 12: DINO's dino_deitsmall8_pretrain.pth, which is "
                                            r"annotation.backbone=vit_small_patch8_224.dino"):
        load_backbone("vit_small_patch16_224.dino", tmp_path / "dino_deitsmall8_pretrain.pth", {"img_size": 32})
    # the tiny ViT's file for a ViT-B/16 config: same patch size here, so the width mismatch speaks
    torch.save(tiny_vit().state_dict(), tmp_path / "tiny.pth")
    kwargs = {k: TINY_KWARGS[k] for k in ("embed_dim", "depth", "patch_size", "img_size")}
    expected = "backbone_kwargs={" + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + ", num_heads: N}"
    with pytest.raises(BackboneError, match=r"'cls_token' has shape .*" + re.escape(expected)):
        load_backbone("vit_base_patch8_224.dino", tmp_path / "tiny.pth", {"img_size": 32})
    # what it describes loads
    load_backbone(TINY_VIT, tmp_path / "tiny.pth", {**kwargs, "num_heads": 2})


@pytest.mark.parametrize("value, offline", [("1", True), ("yes", True), ("ON", True), ("true", True),
                                            ("0", False), ("no", False), ("off", False), ("FALSE", False), ("", False)])
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(monkeypatch, value, offline):
    """The same flag, read the same way wherever sgdm decides whether to go online (annotation's backbone,
    evaluation's Inception): before, annotation took "no" and "off" for offline and eval "yes" for online."""
    import socket

    from sgdm import environment
    from sgdm.annotation import features

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.delenv("SGDM_OFFLINE", raising=False)
    tried = []

    def connect(*args, **kwargs):
        tried.append(args)
        raise OSError("no network in tests")

    monkeypatch.setattr(socket, "create_connection", connect)
    assert features._hub_reachable() is False
    assert bool(tried) is not offline  # offline: not even tried
    assert environment.offline() is offline  # eval's Inception and the VGG16 download read it


def test_advice_gives_the_img_size_of_the_files_patch_grid(tmp_path):
    """The advice's img_size is the file's own pos_embed grid side times its patch size (4 x 16 = 64 here),
    not the size of the model it was tried in (timm's filter resamples pos_embed to that model's grid)."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        small = timm.create_model(TINY_VIT, num_classes=0, img_size=64, patch_size=16, depth=2, embed_dim=64,
                                  num_heads=2)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(BackboneError, match=re.escape("backbone_kwargs={embed_dim: 64, depth: 2, patch_size: 16, "
                                                      "img_size: 64, num_heads: N}")):
        load_backbone(TINY_VIT, tmp_path / "small.pth", {})
