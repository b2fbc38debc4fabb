"""DINO pretraining: loss, centering/sharpening, EMA, multi-crop, save in timm layout."""
import math

import pytest
import torch

from sgdm.config.core import ConfigError, from_dict
from sgdm.features_pretrain.augment import multi_crop, random_resized_crop
from sgdm.features_pretrain.config import PretrainConfig
from sgdm.features_pretrain.dino import DINOHead, dino_loss, ema_update, update_center
from sgdm.features_pretrain.train import build_backbone, pretrain_features, pretrain_record_differs, save_backbone
from tests.evaluation.helpers import RandomImages

TINY_VIT = dict(img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2)


def _direct_dino_loss(student, teacher, center, ts, tt):
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            for b in range(t.shape[0]):
                z = [math.exp(float(t[b, k] - center[0, k]) / tt) for k in range(t.shape[1])]
                p = [v / sum(z) for v in z]
                lse = math.log(sum(math.exp(float(s[b, k]) / ts) for k in range(s.shape[1])))
                total += -sum(p[k] * (float(s[b, k]) / ts - lse) for k in range(s.shape[1])) / t.shape[0]
            pairs += 1
    return total / pairs


def test_dino_loss_matches_direct_cross_entropy(generator):
    student = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
    teacher = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(1, 5, generator=generator, dtype=torch.float64)
    got = dino_loss(student, teacher, center, 0.1, 0.04)
    assert float(got) == pytest.approx(_direct_dino_loss(student, teacher, center, 0.1, 0.04), rel=1e-10)


def test_centering_removes_a_shared_offset_and_sharpening_lowers_entropy(generator):
    student = [torch.randn(4, 6, generator=generator, dtype=torch.float64) for _ in range(3)]
    teacher = [torch.randn(4, 6, generator=generator, dtype=torch.float64) for _ in range(2)]
    center = torch.zeros(1, 6, dtype=torch.float64)
    offset = torch.randn(1, 6, generator=generator, dtype=torch.float64) * 5
    a = dino_loss(student, teacher, center)
    b = dino_loss(student, [t + offset for t in teacher], center + offset)
    assert float(a) == pytest.approx(float(b), rel=1e-10)
    # Against its own softmax, a sharper target is a lower-entropy distribution.
    entropy = lambda tau: float(-(torch.softmax(teacher[0] / tau, -1) * torch.log_softmax(teacher[0] / tau, -1)).sum(-1).mean())  # noqa: E731
    assert entropy(0.04) < entropy(0.1) < entropy(1.0)


def test_center_and_teacher_ema_updates(generator):
    center = torch.ones(1, 3)
    outs = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])]
    update_center(center, outs, 0.9)
    assert torch.allclose(center, 0.9 * torch.ones(1, 3) + 0.1 * torch.tensor([[2.0, 2.0, 2.0]]))
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.99 * teacher.weight.detach().clone() + 0.01 * student.weight.detach()
    ema_update(teacher, student, 0.99)
    assert torch.allclose(teacher.weight, expected)


def test_dino_head_shapes_and_fixed_norm():
    head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4)
    assert head(torch.randn(3, 8)).shape == (3, 16)
    assert not head.last.parametrizations.weight.original0.requires_grad


def test_multi_crop_shapes_range_and_generator_determinism():
    cfg = PretrainConfig(local_crops=3, local_crop_fraction=0.5)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    g1, l1 = multi_crop(images, cfg, torch.Generator().manual_seed(3))
    g2, l2 = multi_crop(images, cfg, torch.Generator().manual_seed(3))
    g3, _ = multi_crop(images, cfg, torch.Generator().manual_seed(4))
    assert [v.shape for v in g1] == [(2, 3, 16, 16)] * 2 and [v.shape for v in l1] == [(2, 3, 8, 8)] * 3
    assert all(torch.equal(a, b) for a, b in zip(g1 + l1, g2 + l2))
    assert not torch.equal(g1[0], g3[0])
    assert all(v.min() >= -1 and v.max() <= 1 for v in g1 + l1)
    with pytest.raises(ValueError, match=r"images: expected \[B, 3, H, W\]"):
        multi_crop(images[:, :1], cfg, None)


def test_random_resized_crop_keeps_content_monotone_and_flips(generator):
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(64, 3, 32, 32).contiguous()
    crops = random_resized_crop(ramp, 16, (0.3, 0.6), generator)
    dx = crops[:, 0, 8, 1:] - crops[:, 0, 8, :-1]
    increasing, decreasing = (dx >= -1e-6).all(1), (dx <= 1e-6).all(1)
    assert (increasing | decreasing).all()
    assert increasing.any() and decreasing.any()  # some crops are mirrored


def test_pretrain_saves_teacher_in_timm_layout(tmp_path, monkeypatch):
    import timm
    from safetensors import safe_open

    seeded = []  # the initialisation is seeded on the CPU generator only, never every CUDA device's
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    cfg = from_dict(PretrainConfig, dict(steps=3, batch_size=4, warmup_steps=1, out_dim=32, hidden_dim=16, bottleneck_dim=8, local_crops=2))
    path = pretrain_features(RandomImages(8), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / "enc.safetensors", log=lambda m: None)
    assert seeded == []
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["architecture"] == "vit_tiny_patch16_224"
    model = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)), **TINY_VIT)
    strict = timm.create_model("vit_tiny_patch16_224", num_classes=0, checkpoint_path=str(path), **TINY_VIT)
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(model.eval()(x), strict.eval()(x))
    assert not list(tmp_path.glob("*.tmp"))


def test_save_backbone_pth_and_bad_suffix(tmp_path):
    model = build_backbone("vit_tiny_patch16_224", TINY_VIT)
    path = save_backbone(model, tmp_path / "enc.pth", "vit_tiny_patch16_224", TINY_VIT)
    assert set(torch.load(path, weights_only=True)) == set(model.state_dict())
    with pytest.raises(ValueError, match="enc.bin: expected a .safetensors or .pth"):
        save_backbone(model, tmp_path / "enc.bin", "vit_tiny_patch16_224", TINY_VIT)


def test_pretrain_record_names_what_changed(tmp_path):
    model = build_backbone("vit_tiny_patch16_224", TINY_VIT)
    made = from_dict(PretrainConfig, dict(steps=5, lr=1e-3))
    path = save_backbone(model, tmp_path / "enc.safetensors", "vit_tiny_patch16_224", TINY_VIT, pretrain=made)
    assert pretrain_record_differs(path, "vit_tiny_patch16_224", TINY_VIT, made) == []
    on_gpu = from_dict(PretrainConfig, dict(steps=5, lr=1e-3, device="cpu"))  # where it ran does not count
    assert pretrain_record_differs(path, "vit_tiny_patch16_224", TINY_VIT, on_gpu) == []
    other = from_dict(PretrainConfig, dict(steps=6, lr=1e-3, max_rotation=90.0))
    assert pretrain_record_differs(path, "vit_tiny_patch16_224", dict(TINY_VIT, depth=2), other) == [
        "annotation.backbone_kwargs", "prepare.pretrain.max_rotation", "prepare.pretrain.steps"]
    assert pretrain_record_differs(path, "resnet18", TINY_VIT, made) == ["annotation.backbone"]
    # No record: a .pth, or a .safetensors written without the settings (elsewhere, or by an older sgdm).
    assert pretrain_record_differs(save_backbone(model, tmp_path / "enc.pth", "vit_tiny_patch16_224", TINY_VIT),
                                   "vit_tiny_patch16_224", TINY_VIT, made) is None
    bare = save_backbone(model, tmp_path / "bare.safetensors", "vit_tiny_patch16_224", TINY_VIT)
    assert pretrain_record_differs(bare, "vit_tiny_patch16_224", TINY_VIT, made) is None
    # The data it was pretrained on: another folder of images is named (a file without the data
    # record, from before it was written, is compared on the rest only).
    mine = {"data.dataset": "image_folder", "data.root": "/data/mine", "data.size": 32}
    enc = save_backbone(model, tmp_path / "data.safetensors", "vit_tiny_patch16_224", TINY_VIT, pretrain=made,
                        data=mine)
    assert pretrain_record_differs(enc, "vit_tiny_patch16_224", TINY_VIT, made, mine) == []
    assert pretrain_record_differs(enc, "vit_tiny_patch16_224", TINY_VIT, made,
                                   dict(mine, **{"data.root": "/data/other"})) == ["data.root"]
    assert pretrain_record_differs(path, "vit_tiny_patch16_224", TINY_VIT, made, mine) == []


def test_pretrain_bad_input_is_named(tmp_path):
    cfg = PretrainConfig(steps=1, batch_size=16)
    with pytest.raises(ValueError, match="8 images, fewer than batch_size 16"):
        pretrain_features(RandomImages(8), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / "e.pth", log=lambda m: None)
    with pytest.raises(ValueError, match="unknown timm architecture 'not_a_net'"):
        build_backbone("not_a_net")
    with pytest.raises(ConfigError, match="pretrain.global_crops"):
        from_dict(PretrainConfig, {"global_crops": 1}, "pretrain")
    with pytest.raises(ConfigError, match="pretrain.local_crop_scale"):
        from_dict(PretrainConfig, {"local_crop_scale": [0.5, 0.2]}, "pretrain")


def test_pretrain_features_cli_writes_encoder_annotate_can_load(tmp_path):
    import yaml

    from sgdm.annotation.features import load_backbone
    from sgdm.cli.main import main
    from tests.evaluation.helpers import tiny_config

    cfg = tiny_config(tmp_path, "label")
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "encoder.pth"
    overrides = ["prepare.pretrain.steps=2", "prepare.pretrain.batch_size=4", "prepare.pretrain.out_dim=16"]
    assert main(["pretrain-features", str(config), *overrides, "--out", str(out)]) == 0
    backbone = load_backbone("vit_tiny_patch16_224", weights=out, kwargs=TINY_VIT)
    assert backbone.weights_id != "random" and backbone.input_size == (16, 16)
    assert main(["pretrain-features", str(config), "prepare.pretrain.global_crops=1"]) == 2


def test_rotated_crops_stay_inside_the_image_and_turn_the_content(generator):
    # A vertical ramp (value = column) crop turned by ~90 degrees varies along rows instead.
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(256, 3, 32, 32).contiguous()
    straight = random_resized_crop(ramp, 16, (0.2, 0.5), generator)
    turned = random_resized_crop(ramp, 16, (0.2, 0.5), generator, max_rotation=180.0)
    assert turned.min() >= -1e-6 and turned.max() <= 1 + 1e-6
    col_change = lambda v: (v[:, 0, :, 1:] - v[:, 0, :, :-1]).abs().mean((1, 2))  # noqa: E731
    row_change = lambda v: (v[:, 0, 1:] - v[:, 0, :-1]).abs().mean((1, 2))  # noqa: E731
    assert (row_change(straight) < 1e-5).all()
    assert (row_change(turned) > col_change(turned)).any()  # some crops are turned by more than 45 degrees
    # no zero padding: a constant image stays constant whatever the angle
    flat = torch.full((64, 3, 32, 32), 0.7)
    assert torch.allclose(random_resized_crop(flat, 16, (0.05, 1.0), generator, max_rotation=180.0), flat[:, :, :16, :16], atol=1e-5)


def test_photometric_hue_and_solarize_settings(generator):
    from sgdm.features_pretrain.augment import photometric

    images = torch.rand(64, 3, 8, 8, generator=generator)
    still = PretrainConfig(color_jitter=0.0, grayscale_prob=0.0, blur_prob=0.0)
    assert torch.equal(photometric(images, still, generator), images)
    solar = PretrainConfig(color_jitter=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=1.0)
    assert torch.allclose(photometric(images, solar, generator), torch.where(images >= 0.5, 1 - images, images))
    # hue_jitter 0 keeps the hue: a saturated red stays red under strong brightness/contrast jitter
    red = torch.tensor([0.85, 0.15, 0.15]).view(1, 3, 1, 1).expand(64, 3, 4, 4)
    out = photometric(red, PretrainConfig(color_jitter=0.8, hue_jitter=0.0, grayscale_prob=0.0, blur_prob=0.0), generator)
    assert (out[:, 0] >= out[:, 1] - 1e-6).all() and (out[:, 0] >= out[:, 2] - 1e-6).all()
    for key, value in (("hue_jitter", 0.6), ("solarize_prob", 1.5), ("max_rotation", 270.0)):
        with pytest.raises(ConfigError, match=f"pretrain.{key}"):
            from_dict(PretrainConfig, {key: value}, "pretrain")


def test_photometric_colour_jitter_styles(generator):
    """color_jitter_style dino is DINO's ColorJitter(0.4, 0.4, ...): brightness scales the grey level
    by [0.6, 1.4], contrast scales the deviation from the mean grey by [0.6, 1.4], saturation keeps
    the grey image. additive (kornia's plain ops) adds b - 1 and never changes the contrast: 5% of
    the views of this dark image keep under 6% of its brightness."""
    from kornia.color import rgb_to_grayscale

    from sgdm.features_pretrain.augment import photometric

    field = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    base = torch.nn.functional.interpolate(field, size=32, mode="bilinear") * 0.4 + 0.1  # mean grey ~0.3

    def ratios(style):
        cfg = PretrainConfig(color_jitter=0.4, hue_jitter=0.0, grayscale_prob=0.0, blur_prob=0.0,
                             color_jitter_style=style)
        out = photometric(base.expand(512, 3, 32, 32), cfg, generator)
        grey, grey0 = rgb_to_grayscale(out).flatten(1), rgb_to_grayscale(base).flatten(1)
        return grey.mean(1) / grey0.mean(1), (grey.std(1) / grey.mean(1)) / (grey0.std(1) / grey0.mean(1))

    brightness, contrast = ratios("dino")
    assert brightness.min() > 0.6 - 1e-3 and brightness.max() < 1.4 + 1e-3
    assert contrast.min() > 0.6 - 1e-3 and contrast.max() < 1.4 + 1e-3
    assert (contrast < 0.8).any() and (contrast > 1.2).any()  # the contrast does change
    brightness, _ = ratios("additive")
    assert brightness.quantile(0.05) < 0.1
    assert PretrainConfig().color_jitter_style == "additive"  # the default keeps existing encoders' recipe
    with pytest.raises(ConfigError, match="color_jitter_style"):
        from_dict(PretrainConfig, {"color_jitter_style": "torchvision"}, "pretrain")


def test_pretrain_features_refuses_an_output_it_cannot_save_before_training(tmp_path, capsys, monkeypatch):
    """--out with another suffix (or annotation.weights) failed in save_backbone, after the whole training."""
    import yaml

    import sgdm.features_pretrain.train as pretrain_train
    from sgdm.cli.main import main
    from tests.evaluation.helpers import tiny_config

    monkeypatch.setattr(pretrain_train, "pretrain_features", lambda *a, **k: pytest.fail("trained before the check"))
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, "label")))
    assert main(["pretrain-features", str(config), "--out", str(tmp_path / "encoder.txt")]) == 2
    assert (f"config error: --out: {tmp_path / 'encoder.txt'}: the encoder is saved as a .safetensors, .pth, .pt "
            f"file") in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main(["pretrain-features", str(config), "--out", str(tmp_path / "a-file" / "encoder.pth")]) == 2
    assert "config error: --out: cannot write" in capsys.readouterr().err
    assert main(["pretrain-features", str(config), f"annotation.weights={tmp_path / 'encoder.bin'}"]) == 2
    assert "config error: annotation.weights: " in capsys.readouterr().err
