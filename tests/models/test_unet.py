import math

import pytest
import torch
import torch.nn.functional as F

from sgdm import ops
from sgdm.models.autoencoder import AutoencoderKL

from sgdm.models.conditioning import condition_dims
from sgdm.models.layers import spatial_attention, timestep_embedding
from sgdm.models.unet import UNet

from tests.models.helpers import K, guidance, randomize_, tiny_autoencoder_config, tiny_unet_config


def make_unet(kind, generator, **overrides):
    cond_dim, cond_channels = condition_dims(guidance(kind))
    return randomize_(UNet(tiny_unet_config(**overrides), cond_dim, cond_channels), generator)


def make_inputs(kind, generator, b=2, map_size=16):
    x = torch.randn(b, 4, 8, 8, generator=generator)
    t = torch.tensor([3, 700])[:b]
    cond = cond_map = None
    if kind in ("label", "box"):
        cond = torch.eye(K)[[1, 3]][:b]
    if kind == "box":
        cond_map = (torch.rand(b, 1, map_size, map_size, generator=generator) > 0.5).float()
    if kind == "mask":
        cond_map = (torch.rand(b, K, map_size, map_size, generator=generator) > 0.5).float()
        cond = cond_map.amax(dim=(2, 3))
    return x, t, cond, cond_map


@pytest.mark.parametrize("kind", ["none", "label", "box", "mask"])
def test_shapes_and_gradients_every_granularity(kind, generator):
    model = make_unet(kind, generator)
    x, t, cond, cond_map = make_inputs(kind, generator)
    for c in (cond, cond_map):
        if c is not None:
            c.requires_grad_(True)
    out = model(x, t, cond, cond_map)
    assert out.shape == x.shape
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    for c in (cond, cond_map):
        if c is not None:
            assert c.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["label", "box", "mask"])
def test_null_condition_is_zeros_and_guidance_changes_output(kind, generator):
    model = make_unet(kind, generator).eval()
    x, t, cond, cond_map = make_inputs(kind, generator)
    with torch.no_grad():
        uncond = model(x, t)
        zeros = model(x, t, torch.zeros_like(cond), None if cond_map is None else torch.zeros_like(cond_map))
        guided = model(x, t, cond, cond_map)
    torch.testing.assert_close(uncond, zeros)
    assert (guided - uncond).abs().max() > 1e-4


def test_fresh_model_predicts_zero_from_zero_init_output():
    model = UNet(tiny_unet_config(), K, 1)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.eye(K)[:2], torch.ones(2, 1, 8, 8))
    assert torch.count_nonzero(out) == 0


def test_cond_map_is_resized_to_latent_grid_nearest(generator):
    model = make_unet("box", generator).eval()
    x, t, cond, _ = make_inputs("box", generator)
    small = (torch.rand(2, 1, 8, 8, generator=generator) > 0.5).float()
    big = small.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond, big), model(x, t, cond, small))


def test_area_resize_averages_coverage(generator):
    model = make_unet("box", generator, cond_resize="area").eval()
    x, t, cond, _ = make_inputs("box", generator)
    big = (torch.rand(2, 1, 16, 16, generator=generator) > 0.5).float()
    avg = torch.nn.functional.avg_pool2d(big, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond, big), model(x, t, cond, avg))


def test_gradient_checkpointing_matches_plain(generator):
    plain = make_unet("label", generator)
    ckpt = UNet(tiny_unet_config(gradient_checkpointing=True), K, 0)
    ckpt.load_state_dict(plain.state_dict())
    x, t, cond, _ = make_inputs("label", generator)
    out_a, out_b = plain(x, t, cond), ckpt(x, t, cond)
    torch.testing.assert_close(out_a, out_b)
    out_a.sum().backward()
    out_b.sum().backward()
    for (name, pa), pb in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_variants_without_updown_and_scale_shift_and_head_channels(generator):
    model = make_unet("label", generator, resblock_updown=False, use_scale_shift_norm=False,
                      num_head_channels=32, dropout=0.1)
    x, t, cond, _ = make_inputs("label", generator)
    out = model(x, t.float() + 0.5, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # A scalar timestep is broadcast over the batch.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(5), cond), model(x, torch.tensor([5, 5]), cond))


def test_unguided_model_rejects_any_condition(generator):
    model = make_unet("none", generator)
    x, t, _, _ = make_inputs("none", generator)
    with pytest.raises(ValueError, match="^cond: .*cond_dim=0"):
        model(x, t, torch.zeros(2, K))
    with pytest.raises(ValueError, match="^cond_map: .*cond_channels=0"):
        model(x, t, None, torch.zeros(2, 1, 8, 8))


def test_bad_inputs_name_the_argument(generator):
    model = make_unet("box", generator)
    x, t, cond, cond_map = make_inputs("box", generator)
    with pytest.raises(ValueError, match=r"^cond: expected shape \[2, 5\]"):
        model(x, t, torch.zeros(2, K + 1), cond_map)
    with pytest.raises(ValueError, match=r"^cond_map: expected shape \[2, 1, H, W\]"):
        model(x, t, cond, torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="^cond_map: this UNet takes both"):
        model(x, t, cond, None)
    with pytest.raises(ValueError, match=r"^t: expected shape \[2\]"):
        model(x, torch.tensor([1, 2, 3]), cond, cond_map)
    with pytest.raises(ValueError, match=r"^x_t: expected \[B, 4, h, w\]"):
        model(torch.zeros(2, 3, 8, 8), t, cond, cond_map)
    with pytest.raises(ValueError, match="^x_t: spatial size"):
        model(torch.zeros(2, 4, 7, 8), t, cond, cond_map)


def test_timestep_embedding_matches_formula_float64():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    emb = timestep_embedding(t, 6)
    half = 3
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            f = math.exp(-math.log(10000.0) * j / half)
            assert emb[i, j].item() == pytest.approx(math.cos(ti * f), abs=1e-5)
            assert emb[i, half + j].item() == pytest.approx(math.sin(ti * f), abs=1e-5)
    assert timestep_embedding(t, 7)[:, -1].abs().max() == 0
    with pytest.raises(ValueError, match="^t: "):
        timestep_embedding(torch.zeros(2, 2), 4)


def test_spatial_attention_matches_float64_per_head_reference(generator):
    b, c, h, w, heads = 2, 8, 3, 4, 2
    q, k, v = (torch.randn(b, c, h, w, generator=generator, dtype=torch.float64) for _ in range(3))
    out = spatial_attention(q, k, v, heads)
    d = c // heads
    for i in range(b):
        for hd in range(heads):
            qs, ks, vs = (z[i, hd * d:(hd + 1) * d].reshape(d, h * w) for z in (q, k, v))
            weights = torch.softmax(qs.T @ ks / math.sqrt(d), dim=-1)
            ref = (weights @ vs.T).T.reshape(d, h, w)
            torch.testing.assert_close(out[i, hd * d:(hd + 1) * d], ref)


def test_norms_and_attention_go_through_sgdm_ops(generator, monkeypatch):
    """The models call sgdm.ops (kernels when built), never F.group_norm or SDPA directly."""
    calls = {"group_norm_silu": 0, "attention": 0}

    def counting(name):
        real = getattr(ops, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(ops, name, counting(name))
    monkeypatch.setattr(F, "scaled_dot_product_attention", None)
    model = make_unet("label", generator)
    x, t, cond, _ = make_inputs("label", generator)
    model(x, t, cond)
    norms = sum(1 for m in model.modules() if type(m).__name__ == "GroupNorm")
    attns = sum(1 for m in model.modules() if type(m).__name__ == "AttentionBlock")
    assert calls == {"group_norm_silu": norms, "attention": attns}
    ae = AutoencoderKL(tiny_autoencoder_config())
    ae(torch.zeros(1, 3, 16, 16))
    assert calls["attention"] > attns and calls["group_norm_silu"] > norms
