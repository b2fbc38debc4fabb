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

Every load is strict: a missing, unexpected or mis-shaped tensor is a ``ConfigError`` on
``model.autoencoder.checkpoint`` naming the file and the key, and saying what the file holds
(a KL autoencoder of another shape, with the overrides that describe it; a VQ model; no autoencoder).

What the weights cannot tell (``norm_groups``: GroupNorm's grouping has no parameter of its own, so a
file trained with 8 groups loads into a model with 32 and decodes garbage) sgdm records in its own
saves (:func:`settings_record`): as safetensors metadata, or beside ``state_dict`` in a torch file.
A recorded value that differs from the config is a ``ConfigError`` naming the key. Files made
elsewhere record nothing and load as before.
"""
from __future__ import annotations

import pathlib
import pickle
import re
import warnings
from typing import Mapping, Optional

import torch

from sgdm.config.core import ConfigError
from sgdm.models.autoencoder import AutoencoderKL
from sgdm.models.config import AutoencoderConfig

__all__ = ["read_state_dict", "extract_autoencoder_state", "diffusers_to_ldm", "infer_architecture", "load_autoencoder",
           "settings_record", "SETTINGS_KEY"]

_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v",
               "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
_BLOCK = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                    r"\.(\d+)\.(.+)$")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file starts
_RECORDED = ("norm_groups",)  # model.autoencoder keys the weights leave no trace of
SETTINGS_KEY = "sgdm_settings"  # where a torch save keeps settings_record(), beside "state_dict"


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
    with open(path, "rb") as f:
        if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
            raise _unreadable(path, "it is a Git LFS pointer, not the weights; fetch them (git lfs pull)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # Lightning checkpoints may pickle callbacks/hparams objects
            warnings.warn(f"{path}: not loadable with weights_only=True ({type(err).__name__}); loading the full "
                          f"pickle, which runs code from the file; only do this with files you trust", stacklevel=2)
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, empty, not a checkpoint, a pickled class this machine lacks
        raise _unreadable(path, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}"
                          ) from err


def _unreadable(path: pathlib.Path, why: str) -> ConfigError:
    return ConfigError("model.autoencoder.checkpoint", f"{path} cannot be read as a checkpoint ({why})")


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


_LEVEL = re.compile(r"^encoder\.down\.(\d+)\.(block|attn)\.(\d+)\.")


def infer_architecture(state: Mapping[str, torch.Tensor]) -> Optional[dict]:
    """The ``model.autoencoder`` keys that an LDM-named KL autoencoder state fixes (``ch``, ``ch_mult``,
    ``num_res_blocks``, ``z_channels``, ``embed_dim``, ``double_z``, and ``attn_levels``: the encoder
    levels holding attention), or None when ``state`` holds no such autoencoder (``norm_groups`` and
    ``dropout`` leave no trace in the weights)."""
    needed = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight", "post_quant_conv.weight")
    if any(k not in state for k in needed):
        return None
    ch = int(state["encoder.conv_in.weight"].shape[0])
    blocks: dict[int, set] = {}
    attn_levels = set()
    for key in state:
        m = _LEVEL.match(key)
        if m and m.group(2) == "block":
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(3)))
        elif m:
            attn_levels.add(int(m.group(1)))
    widths = [state.get(f"encoder.down.{i}.block.0.conv2.weight") for i in range(len(blocks))]
    if not blocks or sorted(blocks) != list(range(len(blocks))) or any(w is None for w in widths):
        return None
    z_channels = int(state["decoder.conv_in.weight"].shape[1])
    return {"ch": ch, "ch_mult": [int(w.shape[0]) // ch for w in widths], "num_res_blocks": len(blocks[0]),
            "z_channels": z_channels, "embed_dim": int(state["post_quant_conv.weight"].shape[1]),
            "double_z": int(state["encoder.conv_out.weight"].shape[0]) == 2 * z_channels,
            "attn_levels": sorted(attn_levels)}


def _what_differs(cfg: AutoencoderConfig, arch: dict) -> str:
    """What the file is, and the overrides that describe it, where they differ from ``cfg``."""
    fixes = {k: v for k, v in arch.items() if k != "attn_levels" and getattr(cfg, k) != v}
    attn = [cfg.resolution // 2**level for level in arch["attn_levels"]]
    if sorted(cfg.attn_resolutions) != sorted(attn):
        fixes["attn_resolutions"] = attn
    factor = 2 ** (len(arch["ch_mult"]) - 1)
    what = f"the file holds a kl-f{factor} (a KL autoencoder with downsampling factor {factor} and " \
           f"{arch['embed_dim']}-channel latents)"
    if not fixes:
        return what
    overrides = " ".join(f"model.autoencoder.{k}={str(v).replace(' ', '')}" for k, v in fixes.items())
    after = ""
    if factor != cfg.downsample_factor or arch["embed_dim"] != cfg.embed_dim:
        after = (f"; the latents are then data.size/{factor} wide with {arch['embed_dim']} channels, so "
                 f"model.unet.image_size, in_channels and out_channels follow, and a fixed "
                 f"model.autoencoder.scale_factor belongs to another autoencoder")
    return f"{what}; model.autoencoder describes it with {overrides}{after}"


def _mismatch(path, layout: str, cfg: AutoencoderConfig, state: Mapping, detail: str) -> ConfigError:
    source = f"{path} ({layout} layout)"
    if any(k.startswith("quantize.") for k in state):
        what = ("the file is a VQ autoencoder (it has a codebook, quantize.*: LDM's vq-f4 / vq-f8 or a VQGAN); "
                "sgdm's first stage is LDM's KL autoencoder (kl-f4, kl-f8, ...)")
    else:
        arch = infer_architecture(state)
        if arch is None:
            what = (f"the file holds no LDM autoencoder (no encoder.conv_in / decoder.conv_in / post_quant_conv "
                    f"weights; its first keys: {sorted(state)[:4]})")
        else:
            what = _what_differs(cfg, arch)
    return ConfigError("model.autoencoder.checkpoint", f"{source}: {detail}; {what}")


def _check_keys(model: AutoencoderKL, state: Mapping[str, torch.Tensor], path, layout: str) -> None:
    own = {k: v for k, v in model.state_dict().items() if k != "scale_factor"}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        counts = [f"{name} {len(keys)} keys, e.g. {keys[:3]}" for name, keys in
                  (("missing", missing), ("unexpected", unexpected)) if keys]
        raise _mismatch(path, layout, model.cfg, state, f"weights do not match the autoencoder built from "
                                                        f"model.autoencoder ({'; '.join(counts)})")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise _mismatch(path, layout, model.cfg, state,
                            f"'{key}' has shape {tuple(state[key].shape)} in the file but {tuple(value.shape)} "
                            f"in the model built from model.autoencoder")


def settings_record(cfg: AutoencoderConfig) -> dict[str, str]:
    """The ``model.autoencoder`` settings an sgdm save records beside the weights (safetensors metadata
    takes strings only, so the values are strings in both formats): ``{"sgdm.norm_groups": "32"}``."""
    return {f"sgdm.{key}": str(getattr(cfg, key)) for key in _RECORDED}


def _recorded_settings(path: pathlib.Path, raw) -> dict[str, str]:
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    else:
        meta = raw.get(SETTINGS_KEY) if isinstance(raw, Mapping) else None
        meta = meta if isinstance(meta, Mapping) else {}
    return {key[len("sgdm."):]: str(value) for key, value in meta.items() if str(key).startswith("sgdm.")}


def _check_settings(path: pathlib.Path, raw, cfg: AutoencoderConfig) -> None:
    recorded = _recorded_settings(path, raw)
    for key in _RECORDED:
        if key in recorded and recorded[key] != str(getattr(cfg, key)):
            raise ConfigError(f"model.autoencoder.{key}",
                              f"{getattr(cfg, key)}, but {path} was trained with {key}={recorded[key]} (the file "
                              f"records it: the weights cannot tell); set model.autoencoder.{key}={recorded[key]}")


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
    _check_keys(model, state, path, layout)
    _check_settings(pathlib.Path(path), raw, cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if cfg.scale_factor is None and stored_sf is not None:
        model.scale_factor.fill_(stored_sf)
    return model
