"""Training losses of the KL autoencoder (LDM's ``LPIPSWithDiscriminator``), as pure modules.

Generator objective (per batch of B images x, reconstructions x_rec, posterior q):

    rec   = pixel_weight * |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)      (per pixel)
    nll   = sum(rec / exp(logvar) + logvar) / B                                   (learned scalar logvar)
    kl    = sum_b KL(q_b || N(0, I)) / B
    g     = -mean(D(x_rec))                                                        (hinge generator loss)
    loss  = nll + kl_weight * kl + d_weight * disc_factor(step) * g

with the adaptive weight d_weight = disc_weight * ||grad_L nll|| / (||grad_L g|| + 1e-4) at the
decoder's last layer L (clamped to [0, 1e4]), and disc_factor(step) = 0 before ``disc_start``.
Discriminator objective: disc_factor(step) * 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec)))).
The PatchGAN discriminator and the LPIPS network are taming-transformers' modules; the
LPIPS weights come from local files only (see :func:`build_lpips`).

The trainer (manual optimisation) steps two optimizers: the autoencoder's (plus ``logvar``)
on :meth:`AutoencoderLoss.generator_loss`, and the discriminator's on
:meth:`AutoencoderLoss.discriminator_loss`; zero the discriminator's gradients before its
step, since the generator loss also back-propagates into it.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import warnings
from collections import OrderedDict

import torch
from torch import nn

from sgdm.config.core import ConfigError
from sgdm.models.autoencoder import DiagonalGaussian
from sgdm.models.config import AutoencoderLossConfig

__all__ = ["LPIPS", "build_lpips", "default_lpips_heads", "build_discriminator", "AutoencoderLoss"]

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def default_lpips_heads() -> pathlib.Path | None:
    """The LPIPS(VGG) linear heads shipped inside torchmetrics (identical to taming's vgg.pth)."""
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(spec.submodule_search_locations[0]) / "functional" / "image" / "lpips_models" / "vgg.pth"
    return path if path.is_file() else None


class _VGG16Slices(nn.Module):
    """VGG16 conv features cut after relu1_2 .. relu5_3, named like taming's ``vgg16`` (slice1..slice5).

    Built from torchvision's layer list only: the 120M-parameter classifier is never created.
    """

    _CUTS = (0, 4, 9, 16, 23, 30)

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"])
        for i in range(5):
            lo, hi = self._CUTS[i], self._CUTS[i + 1]
            setattr(self, f"slice{i + 1}", nn.Sequential(OrderedDict((str(j), features[j]) for j in range(lo, hi))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(5):
            x = getattr(self, f"slice{i + 1}")(x)
            outs.append(x)
        return outs


class LPIPS(nn.Module):
    """taming's LPIPS (VGG16 backbone, 5 linear heads) built without any download.

    Same submodule names as ``taming.modules.losses.lpips.LPIPS`` and the same forward:
    d(x, y) [B, 1, 1, 1] = sum_l mean_hw(w_l . (phi_l(x)/|phi_l(x)| - phi_l(y)/|phi_l(y)|)^2).
    Inputs are images in [-1, 1]. All parameters are frozen, and the module stays in eval mode (taming's
    heads hold Dropout(0.5) layers, which ``.train()`` on an enclosing model would switch on).
    """

    def __init__(self):
        super().__init__()
        from taming.modules.losses import lpips as tl

        self.scaling_layer = tl.ScalingLayer()
        self.chns = [64, 128, 256, 512, 512]
        self.net = _VGG16Slices()
        for i, c in enumerate(self.chns):
            setattr(self, f"lin{i}", tl.NetLinLayer(c, use_dropout=True))
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from taming.modules.losses.lpips import LPIPS as TamingLPIPS

        return TamingLPIPS.forward(self, x, y)  # exactly taming's computation, on our modules


def _load_vgg_backbone(lpips: LPIPS, state: dict, source: str) -> None:
    state = state.get("state_dict", state)
    own = lpips.net.state_dict()
    mapped = {}
    for key in own:  # "slice3.10.weight" <- torchvision "features.10.weight"
        name = "features." + key.split(".", 1)[1]
        if name not in state:
            raise ValueError(f"{source}: no '{name}' in the file; expected a torchvision VGG16 "
                             f"state dict (features.N.weight/bias)")
        if state[name].shape != own[key].shape:
            raise ValueError(f"{source}: '{name}' has shape {tuple(state[name].shape)}, expected "
                             f"{tuple(own[key].shape)} (VGG16)")
        mapped[key] = state[name]
    lpips.net.load_state_dict(mapped)


def _read_weights(path: pathlib.Path, key: str) -> dict:
    """The state dict in the torch file ``path`` (model.autoencoder.loss.``key``); a file that is not one
    (truncated, a whole pickled model) is a ConfigError naming the key and the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and zip errors come in many types
        detail = str(err).splitlines()[0] if str(err) else "no detail"
        raise ConfigError(f"model.autoencoder.loss.{key}", f"{path} cannot be read as a torch state dict "
                                                           f"({type(err).__name__}: {detail})") from err


def _vgg16_state(vgg16_weights: str | pathlib.Path | None, download: bool) -> tuple[dict, str] | None:
    """(torchvision VGG16 state dict, where it came from), or None when no weights are configured."""
    if vgg16_weights is not None:
        path = pathlib.Path(vgg16_weights)
        if not path.is_file():
            raise FileNotFoundError(f"model.autoencoder.loss.vgg16_weights: {path} does not exist")
        return _read_weights(path, "vgg16_weights"), f"vgg16_weights {path}"
    if not download:
        return None
    from torchvision.models import VGG16_Weights

    from sgdm.environment import download_timeout, offline

    url = VGG16_Weights.IMAGENET1K_V1.url
    cached = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not cached.is_file() and offline():
        raise RuntimeError(f"model.autoencoder.loss.vgg16_download: torchvision's VGG16 weights are not in "
                           f"{cached.parent} and offline mode is set (HF_HUB_OFFLINE / SGDM_OFFLINE); copy "
                           f"{cached.name} there, or set vgg16_weights to a local file")
    try:  # the torch hub cache first; the network only when the file is not cached
        with download_timeout():
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False), url
    except Exception as err:
        raise RuntimeError(f"model.autoencoder.loss.vgg16_download: cannot get torchvision's VGG16 weights "
                           f"({type(err).__name__}: {err}); offline, set vgg16_weights to a local file") from None


def build_lpips(vgg16_weights: str | pathlib.Path | None, heads: str | pathlib.Path | None = None,
                download: bool = False) -> LPIPS | None:
    """LPIPS from a torchvision VGG16 state dict and the linear heads (default: torchmetrics').

    The backbone comes from ``vgg16_weights`` (a local file) or, with ``download``, from
    torchvision (hub cache or network). Without either the perceptual term cannot be
    computed: returns None after a one-time warning. A configured path that does not
    exist is an error.
    """
    vgg = _vgg16_state(vgg16_weights, download)
    if vgg is None:
        _warn_once("LPIPS perceptual loss is switched off: set model.autoencoder.loss.vgg16_weights to a local "
                   "torchvision VGG16 state dict, or vgg16_download: true when online")
        return None
    heads = pathlib.Path(heads) if heads is not None else default_lpips_heads()
    if heads is None or not heads.is_file():
        raise FileNotFoundError(f"model.autoencoder.loss.lpips_heads: {heads or 'torchmetrics vgg.pth'} not found; "
                                f"point it at LPIPS' vgg.pth linear heads")
    lpips = LPIPS()
    _load_vgg_backbone(lpips, *vgg)
    head_state = _read_weights(heads, "lpips_heads")
    missing = [k for k in (f"lin{i}.model.1.weight" for i in range(5)) if k not in head_state]
    if missing:
        raise ValueError(f"model.autoencoder.loss.lpips_heads: {heads} is not an LPIPS VGG head file "
                         f"(missing {missing})")
    lpips.load_state_dict(head_state, strict=False)
    return lpips.eval()


def build_discriminator(cfg: AutoencoderLossConfig, in_channels: int = 3) -> nn.Module:
    """taming's hinge PatchGAN (NLayerDiscriminator, BatchNorm) with pix2pix initialisation."""
    from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

    return NLayerDiscriminator(input_nc=in_channels, ndf=cfg.disc_channels, n_layers=cfg.disc_num_layers).apply(
        weights_init)


def _hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


class AutoencoderLoss(nn.Module):
    """L1 + LPIPS + KL + hinge PatchGAN (from ``disc_start``); see the module docstring."""

    def __init__(self, cfg: AutoencoderLossConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.logvar = nn.Parameter(torch.tensor(float(cfg.logvar_init)))
        self.perceptual = (build_lpips(cfg.vgg16_weights, cfg.lpips_heads, cfg.vgg16_download)
                           if cfg.perceptual_weight > 0 else None)
        self.discriminator = build_discriminator(cfg, in_channels)

    def disc_factor(self, global_step: int) -> float:
        """disc_factor before/after ``disc_start`` (0 before: the GAN terms are off)."""
        return self.cfg.disc_factor if global_step >= self.cfg.disc_start else 0.0

    def _adaptive_weight(self, nll: torch.Tensor, g: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
        weight = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
        return torch.clamp(weight, 0.0, 1e4).detach() * self.cfg.disc_weight

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posterior: DiagonalGaussian,
                       global_step: int, last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Autoencoder objective and detached scalar logs. ``last_layer``: ``ae.decoder.conv_out.weight``
        (needed for the adaptive GAN weight once the discriminator is active)."""
        if inputs.shape != reconstructions.shape:
            raise ValueError(f"reconstructions: shape {tuple(reconstructions.shape)} differs from inputs "
                             f"{tuple(inputs.shape)}")
        b = inputs.shape[0]
        rec = self.cfg.pixel_weight * (inputs - reconstructions).abs()
        if self.perceptual is not None:
            rec = rec + self.cfg.perceptual_weight * self.perceptual(inputs.contiguous(), reconstructions.contiguous())
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / b
        kl = posterior.kl().sum() / b
        loss = nll + self.cfg.kl_weight * kl
        logs = {"rec": rec.detach().mean(), "nll": nll.detach(), "kl": kl.detach(), "logvar": self.logvar.detach()}
        factor = self.disc_factor(global_step)
        if factor > 0:
            g = -self.discriminator(reconstructions.contiguous()).mean()
            if last_layer is None:
                raise ValueError("last_layer: the discriminator is active (global_step >= disc_start); pass the "
                                 "decoder's last layer weight for the adaptive GAN weight")
            d_weight = self._adaptive_weight(nll, g, last_layer) if torch.is_grad_enabled() else torch.tensor(0.0)
            loss = loss + d_weight * factor * g
            logs.update(g_loss=g.detach(), d_weight=d_weight)
        logs.update(total=loss.detach(), disc_factor=torch.tensor(factor))
        return loss, logs

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                           global_step: int) -> tuple[torch.Tensor, dict]:
        """Hinge PatchGAN objective on detached real/reconstructed images (0 before disc_start)."""
        logits_real = self.discriminator(inputs.detach().contiguous())
        logits_fake = self.discriminator(reconstructions.detach().contiguous())
        loss = self.disc_factor(global_step) * _hinge_d_loss(logits_real, logits_fake)
        return loss, {"disc_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
                      "logits_fake": logits_fake.detach().mean()}
