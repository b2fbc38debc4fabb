"""Load pretrained autoencoder weights from a local file in any of the common layouts.

Layouts recognised (from the keys, not the file name):

* ``ldm-full``: a Latent Diffusion checkpoint; the first stage is under
  ``state_dict["first_stage_model.*"]`` and ``state_dict["scale_factor"]`` holds the
  latent scaling (the diffusion model and EMA keys are ignored);
* ``ldm-autoencoder``: a stand-alone LDM ``AutoencoderKL`` checkpoint (``encoder.*``,
  ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``; the training loss' ``loss.*``
  keys are ignored), as ``.ckpt``/``.pt`` or ``.safetensors``; sgdm's own saves are this
  layout plus ``scale_factor``;
* ``diffusers``: a diffusers ``AutoencoderKL`` (``down_blocks.N.resnets.M``, ``mid_block``,
  ``conv_norm_out``; attention as ``to_q``/``to_k``/``to_v``/``to_out.0`` or the older
  ``query``/``key``/``value``/``proj_attn``, stored as Linear [C, C] where LDM has 1x1
  convs [C, C, 1, 1]), converted to LDM names by :func:`diffusers_to_ldm`.

Every load is strict: a missing, unexpected or mis-shaped tensor is an error naming
the file and the key.
"""
from __future__ import annotations

import pathlib
import re
import warnings
from typing import Mapping

import torch

from sgdm.models.autoencoder import AutoencoderKL
from sgdm.models.config import AutoencoderConfig

__all__ = ["read_state_dict", "extract_autoencoder_state", "diffusers_to_ldm", "load_autoencoder"]

_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v",
               "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
_BLOCK = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                    r"\.(\d+)\.(.+)$")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def read_state_dict(path: str | pathlib.Path) -> dict:
    """The raw mapping stored in ``path`` (.safetensors, or a torch pickle such as .ckpt/.pt/.bin)."""
    path = pathlib.Path(path)
    if path.is_dir():  # a diffusers model folder (e.g. a pipeline's vae/)
        found = [path / name for name in _DIFFUSERS_WEIGHTS if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"autoencoder checkpoint {path} is a directory without "
                                    f"{' or '.join(_DIFFUSERS_WEIGHTS)}; give the weights file itself")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder checkpoint {path} does not exist (pretrained weights are read "
                                f"from a local file; nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # Lightning checkpoints may pickle callbacks/hparams objects.
        warnings.warn(f"{path}: not loadable with weights_only=True ({type(err).__name__}); loading the full "
                      f"pickle, which runs code from the file; only do this with files you trust", stacklevel=2)
        return torch.load(path, map_location="cpu", weights_only=False)


def _attn_param(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    for old, new in _ATTN_NAMES.items():
        if rest.startswith(old + "."):
            if new != "norm" and value.dim() == 2:
                value = value[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
            return new + rest[len(old):], value
    return rest, value


def _resnet_param(rest: str) -> str:
    return "nin_shortcut" + rest[len("conv_shortcut"):] if rest.startswith("conv_shortcut.") else rest


def _convert_block(m: re.Match, value: torch.Tensor, num_levels: int) -> tuple[str, torch.Tensor]:
    part, _, index, kind, j, rest = m.groups()
    level = int(index) if part == "encoder" else num_levels - 1 - int(index)  # diffusers lists up blocks coarse-first
    if kind == "resnets":
        return f"{part}.{'down' if part == 'encoder' else 'up'}.{level}.block.{j}.{_resnet_param(rest)}", value
    if kind == "attentions":
        rest, value = _attn_param(rest, value)
        return f"{part}.{'down' if part == 'encoder' else 'up'}.{level}.attn.{j}.{rest}", value
    name = "downsample" if kind == "downsamplers" else "upsample"
    return f"{part}.{'down' if part == 'encoder' else 'up'}.{level}.{name}.{rest}", value


def diffusers_to_ldm(state: Mapping[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to LDM names (``num_levels`` = len(ch_mult))."""
    out = {}
    for key, value in state.items():
        m, mid = _BLOCK.match(key), _MID.match(key)
        if m:
            key, value = _convert_block(m, value, num_levels)
        elif mid:
            part, kind, index, rest = mid.groups()
            if kind == "resnets":
                key = f"{part}.mid.block_{int(index) + 1}.{_resnet_param(rest)}"
            else:
                rest, value = _attn_param(rest, value)
                key = f"{part}.mid.attn_{int(index) + 1}.{rest}"
        else:
            key = key.replace("conv_norm_out.", "norm_out.")
        out[key] = value
    return out


def extract_autoencoder_state(raw: Mapping, num_levels: int) -> tuple[dict, str, float | None]:
    """(LDM-named autoencoder state, layout name, stored scale_factor or None) from a raw mapping."""
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else raw
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict (a mapping of tensors), got {type(state).__name__}")
    if any(k.startswith("first_stage_model.") for k in state):
        sf = state.get("scale_factor")
        sub = {k[len("first_stage_model."):]: v for k, v in state.items()
               if k.startswith("first_stage_model.") and not k.startswith("first_stage_model.loss.")}
        return sub, "ldm-full", None if sf is None else float(sf)
    sf = state.get("scale_factor")
    state = {k: v for k, v in state.items() if not k.startswith("loss.") and k != "scale_factor"}
    if any(".down_blocks." in k or ".mid_block." in k or ".up_blocks." in k for k in state):
        return diffusers_to_ldm(state, num_levels), "diffusers", None if sf is None else float(sf)
    return dict(state), "ldm-autoencoder", None if sf is None else float(sf)


def _check_keys(model: AutoencoderKL, state: Mapping[str, torch.Tensor], source: str) -> None:
    own = {k: v for k, v in model.state_dict().items() if k != "scale_factor"}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the autoencoder built from model.autoencoder "
                         f"(missing {len(missing)} keys, e.g. {missing[:3]}; unexpected {len(unexpected)}, "
                         f"e.g. {unexpected[:3]}); check ch_mult, num_res_blocks and attn_resolutions")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{source}: '{key}' has shape {tuple(state[key].shape)} in the file but "
                             f"{tuple(value.shape)} in the model built from model.autoencoder (check ch, ch_mult, "
                             f"z_channels, embed_dim)")


def load_autoencoder(path: str | pathlib.Path, cfg: AutoencoderConfig) -> AutoencoderKL:
    """Build ``AutoencoderKL(cfg)`` and load ``path`` strictly (any layout above).

    ``scale_factor``: ``cfg.scale_factor`` if set, else the file's (full LDM checkpoints
    and sgdm saves carry one), else left unset (NaN) for :func:`compute_scale_factor`.
    """
    model = AutoencoderKL(cfg)
    raw = read_state_dict(path)
    try:
        state, layout, stored_sf = extract_autoencoder_state(raw, len(cfg.ch_mult))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    _check_keys(model, state, f"{path} ({layout} layout)")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if cfg.scale_factor is None and stored_sf is not None:
        model.scale_factor.fill_(stored_sf)
    return model
