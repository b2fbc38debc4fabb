"""DINO's optimisation recipe in pretraining: per-parameter gradient clipping, the frozen last layer,
the weight-decay schedule and parameter groups, the teacher-temperature warm-up; defaults unchanged."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from sgdm.config.core import ConfigError, from_dict
from sgdm.features_pretrain import train
from sgdm.features_pretrain.augment import multi_crop
from sgdm.features_pretrain.config import PretrainConfig
from sgdm.features_pretrain.dino import DINOHead, clip_grad_per_parameter_, dino_loss, ema_update, update_center
from sgdm.features_pretrain.train import build_backbone, pretrain_features, pretrain_record_differs, save_backbone
from tests.evaluation.helpers import RandomImages

TINY_VIT = dict(img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2)
TINY = dict(batch_size=4, warmup_steps=1, out_dim=32, hidden_dim=16, bottleneck_dim=8, local_crops=2, lr=1e-2)


def _run(tmp_path, cfg, name="enc.safetensors", on_step=None):
    return pretrain_features(RandomImages(8), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / name, log=lambda m: None,
                             on_step=on_step)


def _teacher(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_clip_grad_per_parameter_clips_each_tensor_alone(generator):
    params = [nn.Parameter(torch.zeros(n)) for n in (5, 7, 3, 4)]
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    grads = [g / g.norm() * target for g, target in zip(grads, (10.0, 0.5, 6.0, 2.999))]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    params.append(nn.Parameter(torch.zeros(2)))  # no gradient: skipped
    norms = clip_grad_per_parameter_(params, 3.0)
    assert norms.tolist() == pytest.approx([10.0, 0.5, 6.0, 2.999], rel=1e-5)
    for p, g, clipped in zip(params, grads, (True, False, True, False)):
        if clipped:  # down to the bound, same direction
            assert float(p.grad.norm()) == pytest.approx(3.0, rel=1e-5)
            assert torch.allclose(p.grad, g * 3.0 / g.norm(), rtol=1e-5, atol=1e-7)
        else:  # within the bound: bit for bit, although the total norm (~12) is far above it
            assert torch.equal(p.grad, g)
    assert params[-1].grad is None
    assert clip_grad_per_parameter_([nn.Parameter(torch.zeros(1))], 3.0).numel() == 0


def _last_layer(student):
    return student["head"].last.parametrizations.weight.original1


def test_last_layer_frozen_for_the_first_steps_then_trained(tmp_path, one_thread):
    seen = []

    def record(step, student, optimizer):
        last = _last_layer(student)
        seen.append((last.detach().clone(), len(optimizer.state.get(last, {})),
                     student["backbone"].patch_embed.proj.weight.detach().clone()))

    _run(tmp_path, PretrainConfig(steps=5, freeze_last_layer_steps=3, **TINY), on_step=record)
    # never stepped by AdamW (no state) so still its initial value, while the backbone trains
    assert [state for _, state, _ in seen[:3]] == [0, 0, 0]
    assert all(torch.equal(seen[0][0], v) for v, _, _ in seen[1:3])
    assert not torch.equal(seen[0][2], seen[1][2])
    # step 3 (the fourth) updates it
    assert seen[3][1] > 0 and not torch.equal(seen[3][0], seen[2][0])
    assert not torch.equal(seen[4][0], seen[3][0])
    # without freezing the first step already moves it (same seed, same initialisation)
    unfrozen = []
    _run(tmp_path, PretrainConfig(steps=1, **TINY), "free.safetensors",
         on_step=lambda step, student, optimizer: unfrozen.append(_last_layer(student).detach().clone()))
    assert not torch.equal(unfrozen[0], seen[0][0])


def test_weight_decay_cosine_schedule_values():
    cfg = PretrainConfig(steps=11, weight_decay=0.04, weight_decay_end=0.4)
    values = [train._weight_decay(cfg, s) for s in range(11)]
    assert values[0] == pytest.approx(0.04, abs=1e-12) and values[-1] == pytest.approx(0.4, abs=1e-12)
    assert values[5] == pytest.approx(0.22, abs=1e-12)  # cosine midpoint
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[1] - values[0] < values[5] - values[4]  # slow start (cosine, not linear)
    assert {train._weight_decay(PretrainConfig(steps=11), s) for s in range(11)} == {0.04}  # default: constant


def test_weight_decay_groups_and_schedule_in_training(tmp_path, one_thread):
    seen = []

    def record(step, student, optimizer):
        seen.append([(g["weight_decay"], {id(p) for p in g["params"]}) for g in optimizer.param_groups])

    cfg = PretrainConfig(steps=4, weight_decay_end=0.4, decay_bias_and_norm=False, **TINY)
    _run(tmp_path, cfg, on_step=record)
    assert [round(s[0][0], 12) for s in seen] == [round(train._weight_decay(cfg, i), 12) for i in range(4)]
    assert seen[0][0][0] == pytest.approx(0.04) and seen[-1][0][0] == pytest.approx(0.4)
    assert all(s[1][0] == 0.0 for s in seen)  # biases and norms: never decayed
    # which parameters go where (DINO's rule: biases and 1-D tensors undecayed)
    student = nn.ModuleDict({"backbone": build_backbone("vit_tiny_patch16_224", TINY_VIT, dynamic_size=True),
                             "head": DINOHead(32, 32, 16, 8)})
    decayed, plain = train._param_groups(student, cfg)
    names = {id(p): n for n, p in student.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert plain["weight_decay"] == 0.0
    assert {"backbone.norm.weight", "backbone.norm.bias", "backbone.blocks.0.attn.qkv.bias", "head.mlp.0.bias"} <= plain_names
    assert {"backbone.blocks.0.attn.qkv.weight", "backbone.pos_embed", "backbone.cls_token",
            "head.last.parametrizations.weight.original1"} <= decayed_names
    assert all(n.endswith(".bias") or student.get_parameter(n).ndim == 1 for n in plain_names)
    assert not plain_names & decayed_names
    assert "head.last.parametrizations.weight.original0" not in plain_names | decayed_names  # the fixed gain
    # default: one group, every trainable parameter, constant decay
    _run(tmp_path, PretrainConfig(steps=2, **TINY), "default.safetensors", on_step=record)
    default = seen[4:]
    assert [len(s) for s in default] == [1, 1] and {s[0][0] for s in default} == {0.04}
    assert len(default[0][0][1]) == sum(1 for p in student.parameters() if p.requires_grad)


def test_teacher_temperature_warmup(tmp_path, monkeypatch, one_thread):
    cfg = PretrainConfig(steps=6, teacher_temp=0.04, warmup_teacher_temp=0.02, warmup_teacher_temp_steps=3)
    assert [train._teacher_temp(cfg, s) for s in range(6)] == pytest.approx([0.02, 0.03, 0.04, 0.04, 0.04, 0.04])
    one = PretrainConfig(steps=3, warmup_teacher_temp=0.02, warmup_teacher_temp_steps=1)
    assert [train._teacher_temp(one, s) for s in range(3)] == pytest.approx([0.02, 0.04, 0.04])
    assert {train._teacher_temp(PretrainConfig(), s) for s in range(5)} == {0.04}
    used = []

    def spy(student_out, teacher_out, center, student_temp, teacher_temp):
        used.append(teacher_temp)
        return dino_loss(student_out, teacher_out, center, student_temp, teacher_temp)

    monkeypatch.setattr(train, "dino_loss", spy)
    _run(tmp_path, PretrainConfig(steps=4, warmup_teacher_temp=0.01, warmup_teacher_temp_steps=3, **TINY))
    assert used == pytest.approx([0.01, 0.025, 0.04, 0.04])


def test_clip_scope_selects_the_clipping(tmp_path, monkeypatch, one_thread):
    calls = {"total": [], "per_parameter": []}
    total, per_parameter = torch.nn.utils.clip_grad_norm_, train.clip_grad_per_parameter_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, *a, **k: calls["total"].append(max_norm) or total(params, max_norm, *a, **k))
    monkeypatch.setattr(train, "clip_grad_per_parameter_",
                        lambda params, max_norm: calls["per_parameter"].append(max_norm) or per_parameter(params, max_norm))
    _run(tmp_path, PretrainConfig(steps=2, **TINY), "a.safetensors")
    assert calls == {"total": [3.0, 3.0], "per_parameter": []}  # the default: one total-norm clip at 3
    _run(tmp_path, PretrainConfig(steps=2, clip_grad=2.5, clip_grad_scope="per_parameter", **TINY), "b.safetensors")
    assert calls["per_parameter"] == [2.5, 2.5] and len(calls["total"]) == 2
    _run(tmp_path, PretrainConfig(steps=2, clip_grad=None, **TINY), "c.safetensors")
    assert len(calls["total"]) == 2 and len(calls["per_parameter"]) == 2


def _previous_training(dataset, cfg):
    """pretrain_features as it was before the recipe keys (a938ce0), the teacher's state returned."""
    generator = torch.Generator().manual_seed(cfg.seed)
    torch_init = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=torch_init)))
        student = build_backbone("vit_tiny_patch16_224", TINY_VIT, dynamic_size=True)
        head = DINOHead(student.num_features, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
    student_model = nn.ModuleDict({"backbone": student, "head": head})
    teacher_model = copy.deepcopy(student_model).requires_grad_(False)
    center = torch.zeros(1, cfg.out_dim)
    params = [p for p in student_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = train._Batches(dataset, cfg, generator)
    for step in range(cfg.steps):
        lr, momentum = train._schedules(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        global_views, local_views = multi_crop(next(batches), cfg, generator)
        with torch.no_grad():
            teacher_out = [teacher_model["head"](teacher_model["backbone"](v)) for v in global_views]
        student_out = [student_model["head"](student_model["backbone"](v)) for v in global_views + local_views]
        loss = dino_loss(student_out, teacher_out, center, cfg.student_temp, cfg.teacher_temp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        ema_update(teacher_model, student_model, momentum)
        update_center(center, teacher_out, cfg.center_momentum)
    return teacher_model["backbone"].state_dict()


def test_defaults_reproduce_the_previous_training_bit_for_bit(tmp_path, one_thread):
    cfg = PretrainConfig(steps=4, **TINY)
    before = _previous_training(RandomImages(8), cfg)
    now = _teacher(_run(tmp_path, cfg))
    assert set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in now)
    # and each recipe key does change the result (the comparison above can tell)
    for change in (dict(clip_grad_scope="per_parameter"), dict(freeze_last_layer_steps=2),
                   dict(weight_decay_end=0.4), dict(decay_bias_and_norm=False),
                   dict(warmup_teacher_temp=0.02, warmup_teacher_temp_steps=2), dict(view_recipe="dino")):
        other = _teacher(_run(tmp_path, PretrainConfig(steps=4, **TINY, **change), "other.safetensors"))
        assert not all(torch.equal(other[k], before[k]) for k in other), change


def test_recipe_keys_validate_and_old_records_read_at_defaults(tmp_path):
    for key, value in (("clip_grad", 0.0), ("clip_grad_scope", "global"), ("freeze_last_layer_steps", -1),
                       ("weight_decay", -0.1), ("weight_decay_end", -0.1), ("warmup_teacher_temp_steps", -2),
                       ("decay_bias_and_norm", "no")):
        with pytest.raises(ConfigError, match=f"pretrain.{key}"):
            from_dict(PretrainConfig, {key: value}, "pretrain")
    with pytest.raises(ConfigError, match="pretrain.warmup_teacher_temp_steps"):
        from_dict(PretrainConfig, {"warmup_teacher_temp": 0.02}, "pretrain")
    with pytest.raises(ConfigError, match="pretrain.warmup_teacher_temp:"):
        from_dict(PretrainConfig, {"warmup_teacher_temp_steps": 10}, "pretrain")
    with pytest.raises(ConfigError, match="pretrain.warmup_teacher_temp:"):
        from_dict(PretrainConfig, {"warmup_teacher_temp": 0.0, "warmup_teacher_temp_steps": 10}, "pretrain")
    assert from_dict(PretrainConfig, {"clip_grad": None}).clip_grad is None
    # An encoder recorded before these keys existed matches the defaults and names a changed key.
    from safetensors.torch import load_file, save_file

    model = build_backbone("vit_tiny_patch16_224", TINY_VIT)
    path = save_backbone(model, tmp_path / "enc.safetensors", "vit_tiny_patch16_224", TINY_VIT, pretrain=PretrainConfig())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    record = json.loads(meta["pretrain"])
    new_keys = ("weight_decay_end", "decay_bias_and_norm", "clip_grad", "clip_grad_scope", "freeze_last_layer_steps",
                "warmup_teacher_temp", "warmup_teacher_temp_steps")
    assert set(new_keys) <= set(record)
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=dict(meta, pretrain=json.dumps({k: v for k, v in record.items()
                                                                                        if k not in new_keys})))
    assert pretrain_record_differs(old, "vit_tiny_patch16_224", TINY_VIT, PretrainConfig()) == []
    assert pretrain_record_differs(old, "vit_tiny_patch16_224", TINY_VIT, PretrainConfig(freeze_last_layer_steps=62)) == [
        "prepare.pretrain.freeze_last_layer_steps"]


# multi_crop of _VIEW_IMAGES with PretrainConfig() and then with solarize_prob 0.3 and color_jitter_style dino, from
# torch.Generator().manual_seed(7), computed by the code before view_recipe (cc85c20): per view (2 global, 4 local)
# the float64 sum and sum of squares, then the generator's next draw.
_VIEW_IMAGES = lambda: torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # noqa: E731
_VIEWS_BEFORE = [
    ({}, [324.721826553, -655.961511493, -57.559256434, -119.605907619, 91.75949955, 368.317083359],
     [430.192019831, 852.07502024, 235.140308907, 66.44777105, 93.978766053, 268.187401887], 0.35706937313079834),
    ({"solarize_prob": 0.3, "color_jitter_style": "dino"},
     [-113.617141128, -236.72708708, -56.791790366, -177.104087114, -151.574530482, -132.21692729],
     [358.977607738, 283.23323902, 63.778131067, 133.190930697, 114.31311701, 78.609216627], 0.12342828512191772),
]


@pytest.mark.parametrize("change, sums, squares, next_draw", _VIEWS_BEFORE)
def test_default_views_are_those_made_before_view_recipe(change, sums, squares, next_draw, one_thread):
    generator = torch.Generator().manual_seed(7)
    global_views, local_views = multi_crop(_VIEW_IMAGES(), PretrainConfig(**change), generator)
    views = global_views + local_views
    assert [float(v.double().sum()) for v in views] == pytest.approx(sums, rel=1e-6, abs=1e-5)
    assert [float(v.double().square().sum()) for v in views] == pytest.approx(squares, rel=1e-6)
    assert torch.rand(1, generator=generator).item() == next_draw  # the same draws, in the same order


def _marked_views(monkeypatch, cfg, n=4000, seed=0):
    """Which views of a flat light grey image (0.8) ``multi_crop`` blurs and solarizes, per view [n] each, and the
    blurs' kernel sizes and sigmas. The blur is replaced by a mark (0.75), so a view reads 0.8 (neither), 0.2
    (solarized), 0.75 (blurred) or 0.25 (blurred, then solarized)."""
    from sgdm.features_pretrain import augment

    calls = []

    def mark(images, kernel_size, sigma):
        calls.append((kernel_size, sigma.clone()))
        return torch.full_like(images, 0.75)

    monkeypatch.setattr(augment, "gaussian_blur2d", mark)
    images = torch.full((n, 3, 8, 8), 0.6)
    global_views, local_views = multi_crop(images, cfg, torch.Generator().manual_seed(seed))
    marks = []
    for v in global_views + local_views:
        value = ((v + 1) / 2)[:, 0, 0, 0]
        assert torch.allclose((v + 1) / 2, value.view(-1, 1, 1, 1).expand_as(v), atol=1e-5)
        blurred = ((value - 0.75).abs() < 1e-4) | ((value - 0.25).abs() < 1e-4)
        solarized = ((value - 0.2).abs() < 1e-4) | ((value - 0.25).abs() < 1e-4)
        assert (blurred | solarized | ((value - 0.8).abs() < 1e-4)).all()
        marks.append((blurred.double().mean().item(), solarized.double().mean().item()))
    return marks, calls


def test_dino_view_recipe_blurs_and_solarizes_each_view_as_dino(monkeypatch, one_thread):
    """DINO's DataAugmentationDINO: global view 1 blurred always and never solarized, view 2 blurred with
    p 0.1 and solarized with p 0.2, local crops blurred with p 0.5; sigma in [0.1, 2.0] px."""
    plain = dict(color_jitter=0.0, grayscale_prob=0.0, local_crops=2)
    marks, calls = _marked_views(monkeypatch, PretrainConfig(view_recipe="dino", **plain))
    (blur1, sol1), (blur2, sol2), *local = marks
    assert blur1 == 1.0 and sol1 == 0.0
    assert blur2 == pytest.approx(0.1, abs=0.025) and sol2 == pytest.approx(0.2, abs=0.03)
    assert all(b == pytest.approx(0.5, abs=0.04) and s == 0.0 for b, s in local)
    sigma = torch.cat([s for _, s in calls])
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and sigma.min() < 0.2 and sigma.max() > 1.9
    # kernels to +-3 sigma of the largest (13 taps), as far as reflect padding of the 4 px local crops allows (7)
    assert [k for k, _ in calls] == [13, 13, 7, 7]
    # the default: every view as blur_prob and solarize_prob say, sgdm's 3-tap kernel and sigma 0.1-1.0
    marks, calls = _marked_views(monkeypatch, PretrainConfig(solarize_prob=0.3, **plain))
    assert all(b == pytest.approx(0.5, abs=0.04) and s == pytest.approx(0.3, abs=0.04) for b, s in marks)
    assert [k for k, _ in calls] == [3] * 4 and torch.cat([s for _, s in calls]).max() <= 1.0
    # a pure function of (images, generator)
    cfg = PretrainConfig(view_recipe="dino", local_crops=2)
    again = [multi_crop(_VIEW_IMAGES(), cfg, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(sum(again[0], []), sum(again[1], [])))


def test_dino_view_recipe_blurs_wider_than_three_taps(one_thread):
    """sgdm's 3-tap kernel stops at 1 px whatever the sigma; DINO's blur (PIL radius up to 2.0) reaches further."""
    from sgdm.features_pretrain.augment import photometric

    impulse = torch.zeros(64, 3, 16, 16)
    impulse[:, :, 8, 8] = 1.0
    plain = dict(color_jitter=0.0, grayscale_prob=0.0)
    for recipe, reach in (("shared", False), ("dino", True)):
        cfg = PretrainConfig(view_recipe=recipe, **plain)
        out = photometric(impulse, cfg, torch.Generator().manual_seed(0), blur_prob=1.0, solarize_prob=0.0)
        far = out[:, 0].clone()
        far[:, 6:11, 6:11] = 0  # more than 2 px from the impulse
        assert (far.flatten(1).amax(1) > 1e-3).any() == reach, recipe
        assert torch.allclose(out.sum((2, 3)), torch.ones(64, 3), atol=1e-2)  # a normalised kernel


def test_view_recipe_validates_naming_the_key():
    assert PretrainConfig().view_recipe == "shared"
    from_dict(PretrainConfig, {"view_recipe": "dino"}, "pretrain")
    for raw, key in (({"view_recipe": "dinov2"}, "view_recipe"),
                     ({"view_recipe": "dino", "global_crops": 3}, "global_crops"),
                     ({"view_recipe": "dino", "blur_prob": 0.3}, "blur_prob"),
                     ({"view_recipe": "dino", "solarize_prob": 0.2}, "solarize_prob")):
        with pytest.raises(ConfigError, match=rf"^pretrain\.{key}: .*view_recipe" if key != "view_recipe"
                           else r"^pretrain\.view_recipe"):
            from_dict(PretrainConfig, raw, "pretrain")
