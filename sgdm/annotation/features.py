"""Frozen feature extractors (the paper's g, Sec. 3.2) on timm backbones.

:func:`load_backbone` builds a timm model (DINO ViT-B/16 ``vit_base_patch16_224.dino``
by default; any timm name works, with ``backbone_kwargs`` such as
``{img_size: 64, patch_size: 8}`` for custom backbones) and loads weights from
a local ``.pth`` / ``.safetensors`` file in timm's or the original DINO layout,
or from timm's hub when online. :func:`extract` returns, for images in
``[-1, 1]``:

* ``cls [B, D]``: the image feature of the model's own pooling (``forward_head(pre_logits=True)``):
  the CLS token after the final norm for CLS-token ViTs such as DINO; the pooled patch
  tokens for ViTs without a class token (``global_pool`` avg or map); global average
  pool for CNNs,
* ``patches [B, h, w, D]``: the patch tokens (the last feature map for CNNs),
* ``keys [B, h, w, D]``: the last block's attention keys, heads concatenated
  (LOST's features), captured by a forward hook on that block's ``qkv``
  projection; CNNs have no attention, so their keys are the patch features.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import pathlib
import shlex
import socket
from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["Backbone", "BackboneKeys", "Features", "BackboneError", "load_backbone", "extract", "extraction_precision",
           "file_sha256"]

# Wrapper keys of training checkpoints (DINO's checkpoint.pth keeps the teacher
# and student; Lightning/timm keep state_dict/model) and the prefixes they add.
_WRAPPER_KEYS = ("teacher", "state_dict_ema", "model_ema", "state_dict", "model", "student")
_PREFIXES = ("module.", "_orig_mod.", "backbone.")


class BackboneError(ValueError):
    """The backbone name or its weights cannot be used; the message says why."""


@dataclasses.dataclass
class Backbone:
    """A frozen timm feature extractor from :func:`load_backbone`, and how to feed it.

    ``model`` (eval mode, no gradients); ``name`` (timm's); ``input_size`` (H, W) it was built
    for; ``mean`` / ``std``: the per-channel normalisation :func:`preprocess` applies to images in
    [-1, 1]; ``is_vit`` (token output) and its ``num_prefix_tokens`` (CLS, registers);
    ``weights_id``: the SHA-256 of the weights file, or ``hub:<name>`` / ``random``."""

    model: torch.nn.Module
    name: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    is_vit: bool
    num_prefix_tokens: int
    weights_id: str  # sha256 of the weights file, or "hub:<name>" / "random"


@dataclasses.dataclass
class Features:
    """What :func:`extract` returns for B images, all float32: ``cls`` [B, D] (the image feature),
    ``patches`` [B, h, w, D] (patch tokens, or a CNN's last feature map; None unless asked) and
    ``keys`` [B, h, w, D] (a ViT's last-layer attention keys, which LOST uses; None unless asked)."""

    cls: torch.Tensor
    patches: Optional[torch.Tensor]
    keys: Optional[torch.Tensor]


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """SHA-256 of the file at ``path`` as 64 hex digits, read ``block`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _check_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    arch = name.split(".", 1)[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise BackboneError(f"unknown backbone {name!r}: not a timm model name{hint}")


def _read_state_dict(path: pathlib.Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # truncated, a Git LFS pointer, not safetensors at all
            raise BackboneError(f"weights file {path} cannot be read as safetensors: {err}") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors come in many types
            raise BackboneError(f"weights file {path} cannot be read as a torch checkpoint: {err}") from None
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if key is None:
            raise BackboneError(f"weights file {path} holds no tensors (top-level keys: {sorted(state)[:8]})")
        state = state[key]
    cleaned = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = next(key[len(p):] for p in _PREFIXES if key.startswith(p))
        cleaned[key] = value
    return cleaned


@dataclasses.dataclass(frozen=True)
class BackboneKeys:
    """How :func:`load_backbone`'s errors name the settings of the backbone they are about: its caller's
    config keys, and the command-line flags that set them where the command has its own (``sgdm-ldm eval``'s
    extractor is ``eval.feature_backbone``, not ``annotation.backbone``). The defaults are the annotation's."""

    backbone: str = "annotation.backbone"
    kwargs: str = "annotation.backbone_kwargs"
    weights: str = "annotation.weights"
    flags: tuple[str, str, str] | None = None  # the flags of backbone, kwargs, weights

    def name(self, field: str) -> str:
        """``annotation.backbone``, or ``--feature-extractor (eval.feature_backbone)`` where a flag sets it."""
        key = getattr(self, field)
        return key if self.flags is None else f"{self._flag(field)} ({key})"

    def assign(self, field: str, value: str) -> str:
        """The setting of ``field`` to ``value`` as the user writes it: an override, or the flag and its value."""
        key = getattr(self, field)
        return f"{key}={value}" if self.flags is None else f"{self._flag(field)} {shlex.quote(value)} ({key})"

    def check(self) -> str:
        return f"check {self.name('backbone')} / {self.name('kwargs')}"

    def _flag(self, field: str) -> str:
        return self.flags[("backbone", "kwargs", "weights").index(field)]


ANNOTATION_KEYS = BackboneKeys()


# DINO's released backbones (facebookresearch/dino), by (embed_dim, patch size); all have depth 12
_DINO_RELEASES = {(384, 16): ("vit_small_patch16_224.dino", "dino_deitsmall16_pretrain.pth"),
                  (384, 8): ("vit_small_patch8_224.dino", "dino_deitsmall8_pretrain.pth"),
                  (768, 16): ("vit_base_patch16_224.dino", "dino_vitbase16_pretrain.pth"),
                  (768, 8): ("vit_base_patch8_224.dino", "dino_vitbase8_pretrain.pth")}


def _describe_vit(state: dict, keys: BackboneKeys) -> str:
    """What ViT a timm / DINO-layout state dict holds, and the settings (``keys``) that build it ('' if not a ViT)."""
    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    if proj is None or proj.dim() != 4 or pos is None or pos.dim() != 3:
        return ""
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    # positions: the patch grid, after the class token where pos_embed covers it (DINO's does)
    grid = next((g for n in (int(pos.shape[1]) - ("cls_token" in state), int(pos.shape[1]))
                 if (g := round(n ** 0.5)) ** 2 == n), 0)
    what = f"the file holds a ViT with embed_dim {dim}, patch size {patch}, depth {depth}"
    known = _DINO_RELEASES.get((dim, patch))
    if known is not None and depth == 12:
        return f"{what}: DINO's {known[1]}, which is {keys.assign('backbone', known[0])} (no {keys.name('kwargs')})"
    size = f", img_size: {grid * patch}" if grid else ""
    kwargs = f"{{embed_dim: {dim}, depth: {depth}, patch_size: {patch}{size}, num_heads: N}}"
    return (f"{what}: build it with a vit_* {keys.name('backbone')} and {keys.assign('kwargs', kwargs)} "
            f"(num_heads is not stored in the weights)")


def _check_patch_size(model: torch.nn.Module, state: dict, path: pathlib.Path, name: str, keys: BackboneKeys) -> None:
    """timm's checkpoint filter resamples a patch embedding of another size (FlexiViT) without a word, so
    DINO ViT-B/8 weights would load into a ViT-B/16 and give other features: refuse that."""
    own = getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "weight", None)
    theirs = state.get("patch_embed.proj.weight")
    if own is None or theirs is None or theirs.dim() != 4 or tuple(theirs.shape[-2:]) == tuple(own.shape[-2:]):
        return
    raise BackboneError(f"weights file {path} does not match backbone {name}: its patch size is "
                        f"{tuple(theirs.shape[-2:])}, the backbone's {tuple(own.shape[-2:])}; "
                        f"{_describe_vit(state, keys)}; {keys.check()}")


def _load_local(model: torch.nn.Module, path: pathlib.Path, name: str, keys: BackboneKeys) -> None:
    import importlib

    state = _read_state_dict(path)
    _check_patch_size(model, state, path, name, keys)
    described = _describe_vit(state, keys)  # the file's own pos_embed grid: the filter resamples it to the model's
    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except (RuntimeError, ValueError, KeyError) as err:  # e.g. a pos_embed it cannot resample
            raise BackboneError(f"weights file {path} does not match backbone {name}: {err}; "
                                f"{keys.check()}") from None
    own = model.state_dict()
    # classifier / DINO projection heads are not part of a feature extractor
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "fc.", "head_dist."))}
    # load_state_dict(strict=False) still raises on a shape mismatch, one line per tensor
    mismatched = [k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if mismatched:
        key = mismatched[0]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise BackboneError(
            f"weights file {path} does not match backbone {name}: {key!r} has shape {tuple(state[key].shape)} "
            f"in the file, {tuple(own[key].shape)} in the model{more}; {described + '; ' if described else ''}"
            f"{keys.check()}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneError(
            f"weights file {path} does not match backbone {name}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
            f"{keys.check()}"
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    from sgdm.environment import hub_offline

    if hub_offline():
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_pretrained_file(name: str) -> Optional[str]:
    """The local copy of timm's pretrained weights for ``name`` (the Hugging Face hub cache or
    torch hub's checkpoints folder), or None: what can be loaded without a network."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        import huggingface_hub
        from huggingface_hub import constants

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                         cfg.hf_hub_filename):
            if not filename:
                continue
            found = huggingface_hub.try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE,
                                                           revision=revision or None)
            if isinstance(found, str):
                return found
    if cfg.url:
        path = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if path.is_file():
            return str(path)
    return None


def load_backbone(
    name: str,
    weights: Optional[str | os.PathLike] = None,
    kwargs: Optional[dict[str, Any]] = None,
    image_size: int = 0,
    random_init: bool = False,
    keys: BackboneKeys = ANNOTATION_KEYS,
) -> Backbone:
    """Build timm backbone ``name`` in eval mode with frozen weights.

    ``weights``: local file (``.pth``/``.pt``/``.safetensors``; timm layout, the
    original DINO layout, or DINO's full ``checkpoint.pth`` whose teacher is
    used). Without it the weights come from timm's hub, and offline (no route
    to huggingface.co, or ``HF_HUB_OFFLINE=1`` with nothing cached) this fails
    at once. ``random_init`` skips loading (tests only). ``keys``: the settings errors name (default: the
    annotation section's).
    """
    import timm

    _check_name(name)
    kwargs = dict(kwargs or {})
    kwargs.setdefault("num_classes", 0)
    if image_size and "img_size" not in kwargs and name.startswith(("vit", "deit")):
        kwargs["img_size"] = image_size
    # timm initialises from the global RNG (then loads weights over it): the caller's generator stays put
    with torch.random.fork_rng(devices=[]):
        try:
            if weights is not None or random_init:
                model = timm.create_model(name, pretrained=False, **kwargs)
            else:
                offline = not _hub_reachable()
                # Offline, only a cached copy is tried: a download attempt on a network that drops
                # packets would wait out the hub's timeouts and retries before failing.
                cached = cached_pretrained_file(name) if offline else None
                try:
                    if offline and cached is None:
                        raise FileNotFoundError("not in the local hub caches")
                    overlay = {} if cached is None else {"pretrained_cfg_overlay": {"file": cached}}
                    model = timm.create_model(name, pretrained=True, **overlay, **kwargs)
                except TypeError:  # the model's constructor refused a keyword: the kwargs, not the hub
                    raise
                except Exception as err:
                    why = "offline (HF_HUB_OFFLINE or no route to huggingface.co)" if offline else f"download failed: {err}"
                    raise BackboneError(
                        f"backbone {name!r}: no local weights given ({keys.name('weights')}) and the hub cannot be "
                        f"used: {why}; set {keys.name('weights')} to a .pth or .safetensors file"
                    ) from None
        except TypeError as err:
            raise BackboneError(f"backbone {name!r}: bad {keys.name('kwargs')} {kwargs}: {err}") from None
    weights_id = "random" if random_init else f"hub:{name}"
    if weights is not None:
        path = pathlib.Path(weights)
        if not path.is_file():
            raise BackboneError(f"weights file {path} does not exist ({keys.name('weights')}); `sgdm-ldm "
                                f"pretrain-features CONFIG` trains one on your images, as `sgdm-ldm train` does "
                                f"for a config with a prepare: section")
        _load_local(model, path, name, keys)
        weights_id = file_sha256(path)
    model.eval().requires_grad_(False)
    cfg = model.pretrained_cfg or {}
    is_vit = hasattr(model, "blocks") and hasattr(model, "patch_embed")
    if is_vit:
        input_size = tuple(int(s) for s in model.patch_embed.img_size)
    else:
        side = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        input_size = (side, side)
    return Backbone(
        model=model,
        name=name,
        input_size=input_size,
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        is_vit=is_vit,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)) if is_vit else 0,
        weights_id=weights_id,
    )


def preprocess(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` images ``[B, 3, H, W]`` -> resized, ImageNet-normalised backbone input."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"extract: images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    x = (images.float() + 1) / 2
    if tuple(x.shape[-2:]) != backbone.input_size:
        x = F.interpolate(x, size=backbone.input_size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(backbone.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _key_hook(store: dict):
    def hook(module, inputs, output):
        b, t, three_d = output.shape
        store["keys"] = output.view(b, t, 3, three_d // 3)[:, :, 1]  # q | k | v, heads contiguous in each

    return hook


def _check_patch_grid(backbone: Backbone) -> None:
    """A ViT's patch grid must tile its whole input: boxes and masks are placed on the image by
    the grid (cell ``j`` of ``w`` spans ``[j / w, (j + 1) / w]``). With an input that is not a
    multiple of the patch size the strided patch embedding drops the last pixels (or, with
    ``dynamic_img_pad``, adds padding), so every box and mask would be stretched off its place.
    Hybrid (CNN-stem) embeddings pad their convolutions and cover the whole input."""
    from timm.layers import PatchEmbed

    embed = backbone.model.patch_embed
    if not isinstance(embed, PatchEmbed):
        return
    grid, patch = tuple(embed.grid_size), tuple(embed.patch_size)
    covered = (grid[0] * patch[0], grid[1] * patch[1])
    if covered != tuple(backbone.input_size):
        side, p = backbone.input_size[0], patch[0]
        hint = sorted({max(p, side // p * p), -(-side // p) * p})
        raise BackboneError(
            f"backbone {backbone.name!r}: input {backbone.input_size[0]}x{backbone.input_size[1]} is not a multiple "
            f"of the patch size {patch[0]}x{patch[1]}: the {grid[0]}x{grid[1]} patch grid covers "
            f"{covered[0]}x{covered[1]} px, so boxes and masks made on it would be misplaced; set "
            f"annotation.image_size (or backbone_kwargs img_size) to a multiple of the patch size, "
            f"e.g. {' or '.join(map(str, hint))}"
        )


def extraction_precision(setting: str, device: torch.device | str) -> str:
    """The precision (``bf16`` or ``fp32``) features are extracted at on ``device`` for an
    ``annotation.precision`` ``setting``: ``auto`` is bfloat16 autocast on CUDA and float32 elsewhere;
    ``bf16`` and ``fp32`` are themselves on any device. One rule for annotate's features and
    adherence's (which extracts a run's samples at the precision its store's features were made at)."""
    if setting not in ("auto", "fp32", "bf16"):
        raise ValueError(f"annotation.precision: expected auto, fp32 or bf16, got {setting!r}")
    return "bf16" if setting == "bf16" or (setting == "auto" and torch.device(device).type == "cuda") else "fp32"


@torch.no_grad()
def extract(backbone: Backbone, images: torch.Tensor, keys: bool = False, patches: bool = True,
            bf16: Optional[bool] = None) -> Features:
    """Features of ``images [B, 3, H, W]`` in ``[-1, 1]``, as float32.

    ``bf16``: run the backbone under bfloat16 autocast (default: on CUDA only). Patch tokens and
    keys of a ViT need an input that is a multiple of its patch size (:class:`BackboneError`
    otherwise); the CLS feature alone does not."""
    if backbone.is_vit and (keys or patches):
        _check_patch_grid(backbone)
    x = preprocess(backbone, images)
    model = backbone.model
    captured: dict[str, torch.Tensor] = {}
    handle = None
    if keys and backbone.is_vit:
        attn = model.blocks[-1].attn
        if getattr(attn, "qkv", None) is None:
            raise BackboneError(f"backbone {backbone.name!r}: last block has no fused qkv projection to take keys from")
        handle = attn.qkv.register_forward_hook(_key_hook(captured))
    try:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda if bf16 is None else bf16):
            out = model.forward_features(x)
            # a ViT without a class token (global_pool avg / map) has no CLS at out[:, 0]: that is
            # its top-left patch; its own pooling gives the image feature
            pooled = model.forward_head(out, pre_logits=True).float() if backbone.is_vit else None
    finally:
        if handle is not None:
            handle.remove()
    if handle is not None and "keys" not in captured:
        raise BackboneError(f"backbone {backbone.name!r}: its last attention block does not call its qkv "
                            "projection (it applies the weights itself, as BEiT and EVA do), so no keys can be "
                            "taken from it; use annotation.lost.features: tokens")
    out = out.float()
    if backbone.is_vit:
        p = backbone.num_prefix_tokens
        h, w = model.patch_embed.grid_size
        cls = pooled if pooled.dim() == 2 else out[:, 0] if p else out.mean(1)  # global_pool '': unpooled tokens
        patch = out[:, p:].reshape(out.shape[0], h, w, -1)
        key = captured["keys"][:, p:].float().reshape(out.shape[0], h, w, -1) if keys else None
    else:
        cls = out.mean((2, 3))
        patch = out.permute(0, 2, 3, 1)
        key = patch if keys else None
    return Features(cls=cls, patches=patch if patches else None, keys=key)
