import math
import re

import pytest
import torch
from safetensors.torch import save_file

from sgdm.models.autoencoder import AutoencoderKL, compute_scale_factor, load_autoencoder
from sgdm.models.config import AutoencoderConfig

from tests.models.helpers import randomize_, tiny_autoencoder_config


@pytest.fixture
def ae(generator):
    return randomize_(AutoencoderKL(tiny_autoencoder_config()), generator, std=0.1).eval()


@pytest.fixture
def images(generator):
    return torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1


def test_shapes_posterior_and_kl(ae, images, generator):
    post = ae.encode(images)
    assert post.mean.shape == (2, 3, 8, 8) and post.logvar.shape == (2, 3, 8, 8)
    a = post.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, post.sample(torch.Generator().manual_seed(1)))
    assert not torch.equal(a, post.mode())
    mean, logvar = post.mean.double(), post.logvar.double()
    kl_ref = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl().double(), kl_ref, rtol=1e-5, atol=1e-5)
    rec, _ = ae(images, generator=generator)
    assert rec.shape == images.shape
    rec.sum().backward()
    assert all(p.grad is not None for p in ae.parameters())
    with pytest.raises(ValueError, match=r"^x: expected images \[B, 3, H, W\]"):
        ae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"^z: expected latents \[B, 3, h, w\]"):
        ae.decode(torch.zeros(1, 4, 8, 8))


def test_matches_taming_ldm_encoder_decoder_by_name_and_output(generator):
    """taming's Encoder/Decoder are LDM's; their state dicts must load strictly into ours and agree."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder

    cfg = tiny_autoencoder_config(ch=32, norm_groups=32, z_channels=4)  # taming hard-codes 32 groups
    ours = randomize_(AutoencoderKL(cfg), generator, std=0.1).eval()
    kw = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[8], in_channels=3,
              resolution=16, z_channels=4)
    enc, dec = Encoder(double_z=True, **kw).eval(), Decoder(**kw).eval()
    enc.load_state_dict({k[8:]: v for k, v in ours.state_dict().items() if k.startswith("encoder.")}, strict=True)
    dec.load_state_dict({k[8:]: v for k, v in ours.state_dict().items() if k.startswith("decoder.")}, strict=True)
    x = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(ours.encoder(x), enc(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.decoder(z), dec(z), rtol=1e-4, atol=1e-5)


def test_kl_f8_has_ldm_parameter_count_and_names():
    ae = AutoencoderKL(AutoencoderConfig())
    assert sum(p.numel() for p in ae.parameters()) == 83653863  # LDM / Stable Diffusion kl-f8
    keys = set(ae.state_dict())
    for key in ["encoder.down.0.block.1.norm2.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down.2.downsample.conv.weight", "encoder.mid.attn_1.proj_out.weight",
                "decoder.up.3.block.2.conv1.weight", "decoder.up.1.upsample.conv.bias", "decoder.norm_out.bias",
                "quant_conv.weight", "post_quant_conv.bias"]:
        assert key in keys


# An independent LDM -> diffusers renaming, written for the test (diffusers' own layout).
def _to_diffusers(state, num_levels, old_attention_names=False):
    q, k, v, o = ("query", "key", "value", "proj_attn") if old_attention_names else ("to_q", "to_k", "to_v", "to_out.0")
    attn = {"norm": "group_norm", "q": q, "k": k, "v": v, "proj_out": o}
    out = {}
    for key, value in state.items():
        if key == "scale_factor":
            continue
        m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.*)", key)
        mid = re.match(r"(encoder|decoder)\.mid\.(block|attn)_(\d)\.(.*)", key)
        if m:
            part, _, lvl, kind, rest = m.groups()
            idx = int(lvl) if part == "encoder" else num_levels - 1 - int(lvl)
            blocks = "down_blocks" if part == "encoder" else "up_blocks"
            if kind in ("downsample", "upsample"):
                key = f"{part}.{blocks}.{idx}.{kind}rs.0.{rest}"
            elif kind == "block":
                key = f"{part}.{blocks}.{idx}.resnets.{rest.replace('nin_shortcut', 'conv_shortcut')}"
            else:
                j, name, p = rest.split(".")
                key, value = f"{part}.{blocks}.{idx}.attentions.{j}.{attn[name]}.{p}", value.squeeze()
        elif mid:
            part, kind, j, rest = mid.groups()
            if kind == "block":
                key = f"{part}.mid_block.resnets.{int(j) - 1}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
            else:
                name, p = rest.split(".")
                key, value = f"{part}.mid_block.attentions.{int(j) - 1}.{attn[name]}.{p}", value.squeeze()
        else:
            key = key.replace("norm_out", "conv_norm_out")
        out[key] = value.contiguous()
    return out


def _same_outputs(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a.encode(x).mean, b.encode(x).mean)
        z = a.encode(x).mode()
        torch.testing.assert_close(a.decode(z), b.decode(z))


@pytest.mark.parametrize("layout", ["ldm-full", "ldm-autoencoder", "ldm-safetensors", "diffusers", "diffusers-old"])
def test_every_checkpoint_layout_loads_strictly_and_matches(layout, ae, images, tmp_path):
    cfg = ae.cfg
    sd = {k: v for k, v in ae.state_dict().items() if k != "scale_factor"}
    if layout == "ldm-full":
        state = {f"first_stage_model.{k}": v for k, v in sd.items()}
        state.update({"model.diffusion_model.out.weight": torch.zeros(3), "scale_factor": torch.tensor(0.25),
                      "first_stage_model.loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.9999)})
        path = tmp_path / "ldm.ckpt"
        torch.save({"state_dict": state, "global_step": 10}, path)
    elif layout == "ldm-autoencoder":
        path = tmp_path / "ae.ckpt"
        torch.save({"state_dict": {**sd, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight":
                                   torch.zeros(2)}}, path)
    elif layout == "ldm-safetensors":
        path = tmp_path / "ae.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "diffusion_pytorch_model.safetensors"
        converted = _to_diffusers(sd, len(cfg.ch_mult), old_attention_names=layout == "diffusers-old")
        assert any("to_q" in k or "query" in k for k in converted)
        save_file(converted, str(path))
    loaded = load_autoencoder(path, cfg).eval()
    _same_outputs(ae, loaded, images)
    assert loaded.has_scale_factor == (layout == "ldm-full")
    if layout.startswith("diffusers"):  # a diffusers model folder (a pipeline's vae/) loads too
        _same_outputs(ae, load_autoencoder(path.parent, cfg).eval(), images)
    if layout == "ldm-full":
        assert loaded.scale_factor.item() == 0.25


def test_configured_scale_factor_wins_over_file(ae, tmp_path):
    path = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": {**{f"first_stage_model.{k}": v for k, v in ae.state_dict().items()
                                  if k != "scale_factor"}, "scale_factor": torch.tensor(0.25)}}, path)
    cfg = tiny_autoencoder_config(scale_factor=0.5)
    assert load_autoencoder(path, cfg).scale_factor.item() == 0.5


def test_loader_errors_name_file_and_key(ae, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt does not exist"):
        load_autoencoder(tmp_path / "nope.ckpt", ae.cfg)
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match=r"vae is a directory without diffusion_pytorch_model\.safetensors"):
        load_autoencoder(tmp_path / "vae", ae.cfg)
    path = tmp_path / "ae.ckpt"
    torch.save(ae.state_dict(), path)
    with pytest.raises(ValueError, match=r"ae.ckpt \(ldm-autoencoder layout\): 'encoder.conv_in.weight' has shape"):
        load_autoencoder(path, tiny_autoencoder_config(ch=24))
    with pytest.raises(ValueError, match=r"unexpected \d+ keys.*model.autoencoder.attn_resolutions=\[8\]$"):
        load_autoencoder(path, tiny_autoencoder_config(attn_resolutions=[]))
    # sgdm's own save (LDM names + scale_factor buffer) round-trips, including the scale factor.
    ae.scale_factor.fill_(0.7)
    torch.save(ae.state_dict(), path)
    assert load_autoencoder(path, ae.cfg).scale_factor.item() == pytest.approx(0.7)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_saved_norm_groups_must_match_the_config(ae, images, tmp_path, suffix):
    # GroupNorm's grouping leaves no trace in the weights: sgdm's saves record it, and a config that
    # differs is refused by key instead of loading a model that decodes with the wrong statistics.
    from sgdm.config.core import ConfigError
    from sgdm.training.autoencoder import save_autoencoder

    path = tmp_path / f"ae{suffix}"
    save_autoencoder(ae, path)
    _same_outputs(ae, load_autoencoder(path, ae.cfg).eval(), images)
    with pytest.raises(ConfigError, match=rf"^model\.autoencoder\.norm_groups: 4, but .*ae\{suffix} was trained "
                                          rf"with norm_groups=8 .*; set model\.autoencoder\.norm_groups=8$"):
        load_autoencoder(path, tiny_autoencoder_config(norm_groups=4))


def test_compute_scale_factor_and_latent_round_trip(ae, images):
    assert not ae.has_scale_factor
    with pytest.raises(RuntimeError, match="compute_scale_factor"):
        ae.encode_latents(images)
    batches = [images, {"image": images.flip(0)}]
    sf = compute_scale_factor(ae, batches, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = torch.cat([ae.encode(b if torch.is_tensor(b) else b["image"]).sample(gen) for b in batches]).double()
    assert sf == pytest.approx(1.0 / z.flatten().std().item(), rel=1e-5)
    assert ae.scale_factor.item() == pytest.approx(sf)
    lat = ae.encode_latents(images, torch.Generator().manual_seed(2))
    out = ae.decode_latents(lat)
    assert out.shape == images.shape and out.abs().max() <= 1.0
    with pytest.raises(ValueError, match="^batches: need at least one"):
        compute_scale_factor(ae, [])
    assert math.isfinite(sf)


def test_a_bf16_autoencoder_keeps_its_scale_factor_in_float32_and_computes_one(ae, images):
    """A pipeline or first stage cast to bf16 (``.to(torch.bfloat16)``) must not round the latent scale
    factor to 8 bits (0.18215 -> 0.1826, a 0.26% bias of every decoded latent), and compute_scale_factor
    must take float32 images for it (before: a bare "Input type (float) and bias type (BFloat16)" error)."""
    ae.scale_factor.fill_(0.18215)
    half = ae.to(torch.bfloat16)
    assert half.scale_factor.dtype == torch.float32 and half.scale_factor.item() == torch.tensor(0.18215).item()
    assert next(half.parameters()).dtype == torch.bfloat16
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = half.decode((latents / torch.tensor(0.18215)).to(torch.bfloat16)).clamp(-1, 1)
    torch.testing.assert_close(half.decode_latents(latents), expected, rtol=0, atol=0)
    sf = compute_scale_factor(half, [images], torch.Generator().manual_seed(0))
    assert math.isfinite(sf) and half.scale_factor.dtype == torch.float32


def test_wrong_first_stage_file_is_named_with_what_it_holds(tmp_path):
    """kl-f4 for a kl-f8 config, a VQ model, a ViT: a ConfigError on model.autoencoder.checkpoint saying
    what the file is and, for a KL autoencoder, the overrides that describe it."""
    from sgdm.config import ConfigError
    from sgdm.models.checkpoints import infer_architecture

    f8 = tiny_autoencoder_config(ch_mult=[1, 2, 2, 2], z_channels=4, embed_dim=4, resolution=32, attn_resolutions=[])
    f4_cfg = tiny_autoencoder_config(ch=32, attn_resolutions=[8], z_channels=3, embed_dim=3)
    f4 = {k: v for k, v in AutoencoderKL(f4_cfg).state_dict().items() if k != "scale_factor"}
    arch = infer_architecture(f4)
    assert arch == {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 3, "embed_dim": 3,
                    "double_z": True, "attn_levels": [1]}
    path = tmp_path / "kl-f4.ckpt"
    torch.save({"state_dict": {**f4, "loss.logvar": torch.zeros(())}, "global_step": 3}, path)
    with pytest.raises(ConfigError, match=r"kl-f2 .*model.autoencoder.ch=32 model.autoencoder.ch_mult=\[1,2\] "
                                          r"model.autoencoder.z_channels=3 model.autoencoder.embed_dim=3 "
                                          r"model.autoencoder.attn_resolutions=\[16\].*data.size/2") as err:
        load_autoencoder(path, f8)
    assert err.value.key == "model.autoencoder.checkpoint" and str(path) in str(err.value)
    # the overrides it names load the file
    fixed = tiny_autoencoder_config(ch=32, ch_mult=[1, 2], z_channels=3, embed_dim=3, resolution=32,
                                    attn_resolutions=[16])
    load_autoencoder(path, fixed)
    vq = {**f4, "quantize.embedding.weight": torch.zeros(16, 3)}
    torch.save({"state_dict": vq}, path)
    with pytest.raises(ConfigError, match=r"VQ autoencoder .*quantize.*KL autoencoder"):
        load_autoencoder(path, f4_cfg)
    torch.save({"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8)}, path)
    with pytest.raises(ConfigError, match=r"holds no LDM autoencoder .*'cls_token'"):
        load_autoencoder(path, f4_cfg)



def test_float64_latents_are_scaled_in_float64(ae, images):
    """The scale factor's float32 is the floor, not the ceiling: float64 latents keep float64."""
    ae = ae.double()
    ae.scale_factor.fill_(0.18215)
    latents = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ae.decode(latents / torch.tensor(0.18215, dtype=torch.float32).double()).clamp(-1, 1)
    torch.testing.assert_close(ae.decode_latents(latents), expected, rtol=0, atol=0)
    z = ae.encode_latents(images.double(), torch.Generator().manual_seed(1))
    with torch.no_grad():
        n = ae.encode(images.double()).sample(torch.Generator().manual_seed(1))
    assert z.dtype == torch.float64
    torch.testing.assert_close(z, n * torch.tensor(0.18215, dtype=torch.float32).double(), rtol=0, atol=0)
