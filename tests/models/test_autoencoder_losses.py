import warnings

import pytest
import torch
import torch.nn.functional as F

from sgdm.models import autoencoder_losses as al
from sgdm.models.autoencoder import AutoencoderKL
from sgdm.models.config import AutoencoderLossConfig

from tests.models.helpers import randomize_, tiny_autoencoder_config

RELU_AFTER = [3, 8, 15, 22, 29]  # VGG16 features indices of relu1_2 .. relu5_3


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A randomly initialised torchvision VGG16 feature stack saved as a torchvision state dict."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in features.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / max(p[0].numel(), 1)) ** 0.5)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path, features


def _lpips_reference(features, heads, x, y):
    """Float64 LPIPS from the definition: unit-normalised VGG activations, squared diff, 1x1 heads, mean."""
    features = features.double()
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64)[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64)[None, :, None, None]
    hx, hy = (x.double() - shift) / scale, (y.double() - shift) / scale
    total, start = 0.0, 0
    for level, stop in enumerate(RELU_AFTER):
        for layer in features[start:stop + 1]:
            hx, hy = layer(hx), layer(hy)
        start = stop + 1
        nx = hx / (hx.square().sum(1, keepdim=True).sqrt() + 1e-10)
        ny = hy / (hy.square().sum(1, keepdim=True).sqrt() + 1e-10)
        w = heads[f"lin{level}.model.1.weight"].double()
        total = total + F.conv2d((nx - ny) ** 2, w).mean(dim=(2, 3), keepdim=True)
    return total


def test_lpips_from_local_files_matches_float64_definition(vgg_file, generator):
    path, features = vgg_file
    lpips = al.build_lpips(path)
    heads_path = al.default_lpips_heads()
    heads = torch.load(heads_path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(lpips.lin2.model[1].weight, heads["lin2.model.1.weight"])
    assert not any(p.requires_grad for p in lpips.parameters())
    x = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    with torch.no_grad():
        out = lpips(x, y)
        ref = _lpips_reference(features.eval(), heads, x, y)
        assert out.shape == (2, 1, 1, 1)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-6)
        assert lpips(x, x).abs().max() < 1e-6
    # a training loop's model.train() reaches the loss module: LPIPS stays the metric (its heads'
    # Dropout(0.5) would make it random)
    loss = torch.nn.ModuleDict({"perceptual": lpips}).train()
    assert not loss.perceptual.training and not any(m.training for m in loss.perceptual.modules())
    with torch.no_grad():
        torch.testing.assert_close(lpips(x, y), out)


def test_lpips_missing_files_warn_once_or_fail_clearly(tmp_path):
    al._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert al.build_lpips(None) is None
        assert al.build_lpips(None) is None
    assert len([w for w in caught if "vgg16_weights" in str(w.message)]) == 1
    with pytest.raises(FileNotFoundError, match="loss.vgg16_weights: .*missing.pth does not exist"):
        al.build_lpips(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="features.0.weight' has shape"):
        al.build_lpips(bad)
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="no 'features.0.weight' in the file"):
        al.build_lpips(bad)
    with pytest.raises(FileNotFoundError, match="loss.lpips_heads: .*nohead.pth not found"):
        al.build_lpips(bad, heads=tmp_path / "nohead.pth")


def test_lpips_download_fetches_torchvision_weights_or_fails_clearly(vgg_file, monkeypatch, tmp_path):
    path, _ = vgg_file
    urls, timeouts = [], []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SGDM_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def cached(url, **kwargs):
        import socket

        urls.append(url)
        timeouts.append(socket.getdefaulttimeout())
        return torch.load(path, weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", cached)
    assert isinstance(al.build_lpips(None, download=True), al.LPIPS)
    assert urls and "vgg16" in urls[0]
    assert timeouts == [60.0]  # each socket operation of the download is bounded: no hang on a dead network

    def offline(url, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="vgg16_download: cannot get .*set vgg16_weights to a local file"):
        al.build_lpips(None, download=True)


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "SGDM_OFFLINE"])
def test_lpips_download_offline_without_a_cached_file_fails_at_once(flag, vgg_file, monkeypatch, tmp_path):
    # vgg16_download ignored the offline flags and went to the network (no timeout either)
    path, _ = vgg_file
    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SGDM_OFFLINE", raising=False)
    monkeypatch.setenv(flag, "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda url, **kwargs: calls.append(url) or torch.load(path, weights_only=True))
    with pytest.raises(RuntimeError, match=r"vgg16_download: .* not in .*hub.checkpoints and offline mode is set"):
        al.build_lpips(None, download=True)
    assert calls == []
    # a cached download is used offline
    from torchvision.models import VGG16_Weights

    cache = tmp_path / "hub" / "checkpoints" / VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    cache.parent.mkdir(parents=True)
    cache.write_bytes(path.read_bytes())
    assert isinstance(al.build_lpips(None, download=True), al.LPIPS)
    assert len(calls) == 1


def _setup(generator, **loss_cfg):
    ae = randomize_(AutoencoderKL(tiny_autoencoder_config()), generator, std=0.1)
    cfg = AutoencoderLossConfig(perceptual_weight=0.0, disc_start=10, disc_channels=8, disc_num_layers=2,
                                **loss_cfg)
    x = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    rec, post = ae(x, generator=generator)
    return ae, al.AutoencoderLoss(cfg), x, rec, post


def test_generator_loss_before_disc_start_is_nll_plus_kl(generator):
    ae, loss_fn, x, rec, post = _setup(generator, logvar_init=0.5, kl_weight=1e-3)
    loss, logs = loss_fn.generator_loss(x, rec, post, global_step=0)
    lv = 0.5
    nll = ((x - rec).abs().double() / torch.exp(torch.tensor(lv, dtype=torch.float64)) + lv).sum() / 2
    expected = nll + 1e-3 * post.kl().double().sum() / 2
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert logs["disc_factor"] == 0 and "g_loss" not in logs
    loss.backward()
    assert loss_fn.logvar.grad is not None and ae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())


def test_generator_loss_after_disc_start_adds_adaptive_gan_term(generator):
    ae, loss_fn, x, rec, post = _setup(generator, disc_weight=0.5)
    with pytest.raises(ValueError, match="^last_layer: "):
        loss_fn.generator_loss(x, rec, post, global_step=10)
    base, _ = loss_fn.generator_loss(x, rec, post, global_step=9)
    loss, logs = loss_fn.generator_loss(x, rec, post, global_step=10, last_layer=ae.decoder.conv_out.weight)
    assert logs["d_weight"] > 0
    torch.testing.assert_close(loss, base + logs["d_weight"] * logs["g_loss"], rtol=1e-5, atol=1e-5)
    loss.backward()
    assert ae.decoder.conv_out.weight.grad is not None


def test_discriminator_hinge_loss_and_start(generator):
    _, loss_fn, x, rec, _ = _setup(generator)
    loss_fn.eval()  # BatchNorm running statistics: deterministic logits for the reference below
    before, _ = loss_fn.discriminator_loss(x, rec, global_step=0)
    assert before.item() == 0
    loss, logs = loss_fn.discriminator_loss(x, rec, global_step=10)
    with torch.no_grad():
        real, fake = loss_fn.discriminator(x), loss_fn.discriminator(rec)
    expected = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert loss_fn.discriminator.main[0].weight.grad.abs().sum() > 0
    assert logs["logits_fake"] == pytest.approx(fake.mean().item())
