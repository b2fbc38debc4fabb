"""``SelfGuidedPipeline``: sample images from a trained self-guided latent diffusion model.

It holds the UNet (EMA weights), the KL autoencoder, the noise schedule and the
guidance config (kind and K), and runs: per-image noise -> sampler over the
guided denoiser -> decode. Guidance follows the paper's Eq. 4,
eps = (1 - w) eps_uncond + w eps_cond (w = 0 unconditional, w = 1 conditional;
the same as eps_uncond + s (eps_cond - eps_uncond) with s = w).

On-disk format (``save_pretrained`` / ``from_pretrained``)::

    DIR/model.safetensors   tensors "unet.*" (EMA UNet) and "autoencoder.*" (incl. scale_factor);
                            metadata: format "sgdm.pipeline", format_version "1",
                            config = the resolved experiment config as JSON (sections
                            model.{autoencoder,unet,guidance}, diffusion, sampler are read);
                            training's export adds step (the step its EMA weights are from)
    DIR/config.yaml         the same config, for people to read (the metadata is authoritative)

A bare ``.safetensors`` file with that metadata loads too, and a training run
directory loads from its ``pipeline/`` folder (where training exports it).

Reproducibility: image i's randomness (its x_T and, for stochastic samplers,
every step's noise) comes from its own CPU generator seeded with the i-th of
``num_images`` 63-bit seeds drawn from ``generator`` up front, so the same
generator seed gives the same images whatever ``batch_size`` and ``num_images``
(the first i images of a larger call are those of a call for i) and device (up
to floating-point rounding there). The seeds come from the generator's own
stream: a CUDA generator draws other seeds than a CPU one seeded alike. A list
of per-image generators must hold distinct ones.
"""
from __future__ import annotations

import json
import math
import numbers
import operator
import pathlib
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from sgdm.config.core import dump_yaml, from_dict, to_dict
from sgdm.diffusion.config import DiffusionConfig, SamplerConfig
from sgdm.diffusion.guidance import ClassifierFreeGuidance
from sgdm.diffusion.samplers import DEFAULT_SPACING, SPACINGS, get_sampler, sampling_timesteps
from sgdm.diffusion.schedule import eps_from_output, make_schedule
from sgdm.models.config import GuidanceConfig, ModelConfig
from sgdm.models.conditioning import IGNORE_INDEX, box_mask, class_map_one_hot, condition_dims, multi_hot, one_hot

__all__ = ["SelfGuidedPipeline", "GuidanceInputs", "parse_guidance", "build_condition", "per_image_generators",
           "empty_modules", "assign_state", "FORMAT", "WEIGHTS_NAME"]

FORMAT, FORMAT_VERSION, WEIGHTS_NAME = "sgdm.pipeline", "1", "model.safetensors"
OUTPUT_TYPES = ("pil", "pt", "np", "latent")


def per_image_generators(generator, num_images: int) -> list[torch.Generator]:
    """One CPU generator per image: seeded from ``num_images`` seeds drawn from ``generator``
    (a fresh random seed when None); a list of ``num_images`` generators is used as given."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != num_images or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator: a list must hold one torch.Generator per image ({num_images}), "
                             f"got {len(generator)} items")
        first = {}
        for i, g in enumerate(generator):  # [g] * n: the images would take turns drawing from g
            if first.setdefault(id(g), i) != i:
                raise ValueError(f"generator: items {first[id(g)]} and {i} are the same torch.Generator; the images "
                                 f"would share its stream, so they would change with batch_size. Pass distinct "
                                 f"generators ([torch.Generator().manual_seed(s) for s in seeds]) or one generator")
        return list(generator)
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # seeds only this generator, never torch's global one
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or a list of them, got {type(generator).__name__}")
    seeds = torch.randint(0, 2**63 - 1, (num_images,), generator=generator, device=generator.device)
    return [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]


def _positive_int(value, name: str) -> int:
    """``value`` as an int >= 1: Python, numpy and 0-d tensor integers (not bools)."""
    if not isinstance(value, (bool, np.bool_)):
        try:
            value = operator.index(value)
        except TypeError:
            pass
        else:
            if value >= 1:
                return value
    raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _finite_float(value, name: str, what: str, low: Optional[float] = None, high: Optional[float] = None) -> float:
    """``value`` as a finite float in [low, high]: Python, numpy and 0-d tensor numbers (not bools)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        f = float(value)
        if math.isfinite(f) and (low is None or f >= low) and (high is None or f <= high):
            return f
    raise ValueError(f"{name}: expected {what}, got {value!r}")


class SelfGuidedPipeline:
    """Sampling API of a self-guided LDM (see module docstring).

    unet: ``sgdm.models.unet.UNet`` built with ``condition_dims(guidance)``;
    autoencoder: ``sgdm.models.autoencoder.AutoencoderKL`` with its scale_factor set;
    diffusion / guidance / sampler: the configs it was trained and is sampled with;
    config: the full resolved experiment config (dict), stored with the weights.
    """

    def __init__(self, unet, autoencoder, diffusion: DiffusionConfig, guidance: GuidanceConfig,
                 sampler: Optional[SamplerConfig] = None, config: Optional[dict] = None):
        dims = condition_dims(guidance)
        if (unet.cond_dim, unet.cond_channels) != dims:
            raise ValueError(f"unet: built with (cond_dim, cond_channels) = ({unet.cond_dim}, {unet.cond_channels}) "
                             f"but guidance kind {guidance.kind!r} with K={guidance.num_classes} needs {dims}")
        self.unet, self.autoencoder = unet.eval(), autoencoder.eval()
        self.diffusion, self.guidance = diffusion, guidance
        self.sampler = sampler if sampler is not None else SamplerConfig()
        self.schedule = make_schedule(diffusion)
        self.config = dict(config or {})
        self.config.update(model={"autoencoder": to_dict(autoencoder.cfg), "unet": to_dict(unet.cfg),
                                  "guidance": to_dict(guidance)},
                           diffusion=to_dict(diffusion), sampler=to_dict(self.sampler))

    # ----------------------------------------------------------------- building and files
    @classmethod
    def from_config(cls, config: Union[dict, Any], unet=None, autoencoder=None) -> "SelfGuidedPipeline":
        """From an experiment config (ExperimentConfig or its dict); modules not given are built fresh."""
        from sgdm.models.autoencoder import AutoencoderKL
        from sgdm.models.unet import UNet

        data = config if isinstance(config, dict) else to_dict(config)
        model = from_dict(ModelConfig, data.get("model"), "model")
        diffusion = from_dict(DiffusionConfig, data.get("diffusion"), "diffusion")
        sampler = from_dict(SamplerConfig, data.get("sampler"), "sampler")
        if unet is None:
            unet = UNet(model.unet, *condition_dims(model.guidance))
        if autoencoder is None:
            autoencoder = AutoencoderKL(model.autoencoder)
        return cls(unet, autoencoder, diffusion, model.guidance, sampler, data)

    @classmethod
    def from_pretrained(cls, path: Union[str, pathlib.Path], device: Union[str, torch.device, None] = None,
                        dtype: Optional[torch.dtype] = None) -> "SelfGuidedPipeline":
        """Load a pipeline directory, a training run directory (its ``pipeline/``) or a ``.safetensors`` file.

        The weights are the file's (a training run exports its EMA UNet); the networks, schedule and
        sampler defaults are the config stored in its metadata, not ``config.yaml`` beside it. The
        modules are built without initialising weights that the file replaces (``empty_modules``).
        Called under ``torch.inference_mode`` too, the weights are ordinary tensors (trainable).

        device, dtype: where the UNet and autoencoder go and the dtype of their weights (:meth:`to`).
        None: the CPU, and torch's default dtype (float32), to which a bf16 / fp16 file's weights are
        cast as they are read. A file that is not an sgdm pipeline, or whose weights do not fit its
        config, is a ValueError naming the file; a missing one a FileNotFoundError."""
        with torch.inference_mode(False):
            return cls._from_file(_weights_file(pathlib.Path(path)), device, dtype)

    @classmethod
    def _from_file(cls, file: pathlib.Path, device, dtype) -> "SelfGuidedPipeline":
        meta, tensors = _read_weights(file)
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(f"{file}: not an sgdm pipeline file (its safetensors metadata lacks format "
                             f"{FORMAT!r} and the config); write one with SelfGuidedPipeline.save_pretrained")
        if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"{file}: pipeline format_version {meta['format_version']!r}, but this sgdm reads "
                             f"version {FORMAT_VERSION!r}; load it with the sgdm version that wrote it")
        try:
            config = json.loads(meta["config"])
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: the config in its metadata is not valid JSON: {err}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{file}: the config in its metadata is a JSON {type(config).__name__}, not an object")
        unet, autoencoder = empty_modules(from_dict(ModelConfig, config.get("model"), "model"))
        for name, module in (("unet", unet), ("autoencoder", autoencoder)):
            _load_prefixed(module, tensors, name, file)
        return cls.from_config(config, unet, autoencoder).to(device, dtype)

    def save_pretrained(self, path: Union[str, pathlib.Path], metadata: Optional[dict] = None) -> pathlib.Path:
        """Write ``path/model.safetensors`` + ``path/config.yaml``, or one file if ``path`` ends in .safetensors.
        ``metadata``: more string entries for the file's header (training's export writes ``step``)."""
        from safetensors.torch import save_file

        from sgdm.atomic import atomic_path, atomic_write_text

        extra = dict(metadata or {})
        if set(extra) & {"format", "format_version", "config"} or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise ValueError(f"metadata: expected str -> str entries other than format, format_version and config, "
                             f"got {extra!r}")
        path = pathlib.Path(path)
        file = path if path.suffix == ".safetensors" else path / WEIGHTS_NAME
        file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{k}": v.detach().cpu().contiguous().clone()
                   for name, module in (("unet", self.unet), ("autoencoder", self.autoencoder))
                   for k, v in module.state_dict().items()}
        meta = {**extra, "format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(self.config)}
        with atomic_path(file) as tmp:  # an interrupted save never leaves a truncated model.safetensors
            save_file(tensors, str(tmp), metadata=meta)
        if file.parent == path:
            atomic_write_text(path / "config.yaml", dump_yaml(self.config))
        return file

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "SelfGuidedPipeline":
        """Move the UNet and autoencoder to ``device`` and/or cast their weights to ``dtype`` (None keeps
        each as it is; the autoencoder's scale_factor stays float32), in place; returns the pipeline."""
        self.unet.to(device=device, dtype=dtype)
        self.autoencoder.to(device=device, dtype=dtype)
        return self

    def compile(self, mode: str = "default") -> "SelfGuidedPipeline":
        """Run the UNet under ``torch.compile`` (in place, :func:`sgdm.models.compile.compile_network`;
        ``mode``: ``default`` or ``max-autotune-no-cudagraphs``). The first network call at each batch
        shape, dtype and device compiles; the weights and :meth:`save_pretrained` are unchanged."""
        from sgdm.models.compile import compile_network

        compile_network(self.unet, mode)
        return self

    @property
    def device(self) -> torch.device:
        """The device of the UNet's weights, where sampling runs."""
        return next(self.unet.parameters()).device

    @property
    def num_classes(self) -> int:
        """K, the number of self-annotated classes the model is guided by (0 when unguided)."""
        return self.guidance.num_classes if self.guidance.kind != "none" else 0

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one diffusion-space latent (the UNet's ``in_channels`` and ``image_size``)."""
        c = self.unet.cfg
        return c.in_channels, c.image_size, c.image_size

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the decoded images: the latent side times the autoencoder's downsampling factor."""
        side = self.unet.cfg.image_size * self.autoencoder.cfg.downsample_factor
        return side, side

    # ----------------------------------------------------------------- sampling
    def _guidance_scale(self, scale, conditioned: bool) -> float:
        if self.guidance.kind == "none":
            if scale is not None:
                raise ValueError(f"guidance_scale: this model is unguided (model.guidance.kind: none), so there is "
                                 f"nothing to scale; leave guidance_scale unset (got {scale!r})")
            return 1.0
        if scale is not None and not conditioned:
            takes = " and ".join(_INPUTS[self.guidance.kind])
            raise ValueError(f"guidance_scale: no {takes} given, so the samples are unconditional and w has no "
                             f"effect; pass the {takes} to guide them, or leave guidance_scale unset (got {scale!r})")
        scale = self.sampler.guidance_scale if scale is None else scale
        return _finite_float(scale, "guidance_scale", "a finite number w (paper Eq. 4)")

    def sampling_settings(self, num_steps: Optional[int] = None, sampler: Optional[str] = None,
                          eta: Optional[float] = None, spacing: Optional[str] = None) -> tuple[int, str, float, str]:
        """``(num_steps, sampler, eta, spacing)`` that :meth:`__call__` samples with for these arguments: checked,
        with unset ones from the ``sampler`` config; its eta and spacing are for its own sampler: another
        sampler chosen here runs with eta = 0 and its own default spacing (``DEFAULT_SPACING``)."""
        s = self.sampler
        sampler = s.sampler if sampler is None else sampler
        get_sampler(sampler)
        configured = num_steps is None
        num_steps = _positive_int(s.steps if configured else num_steps, "num_steps")
        if num_steps > len(self.schedule):
            origin = " (the model's sampler.steps; choose fewer)" if configured else ""
            raise ValueError(f"num_steps: at most the {len(self.schedule)} training timesteps, got {num_steps}{origin}")
        if eta is None:
            eta = s.eta if sampler == s.sampler else 0.0
        eta = _finite_float(eta, "eta", "a number in [0, 1] (0: deterministic DDIM, 1: DDPM's variance)", 0.0, 1.0)
        if eta and sampler != "ddim":
            raise ValueError(f"eta: only the ddim sampler uses eta; got eta={eta} with sampler={sampler!r}")
        if spacing is None:
            spacing = s.spacing if sampler == s.sampler else None
        spacing = DEFAULT_SPACING[sampler] if spacing is None else spacing
        if spacing not in SPACINGS:
            raise ValueError(f"spacing: expected one of {', '.join(SPACINGS)}, got {spacing!r}")
        return num_steps, sampler, eta, spacing

    def timesteps(self, num_steps: int, spacing: str) -> torch.Tensor:
        """The descending training timesteps a sampler visits with ``spacing``
        (:func:`sgdm.diffusion.samplers.sampling_timesteps`)."""
        return sampling_timesteps(num_steps, self.schedule, spacing)

    @torch.no_grad()
    def __call__(self, num_images: int, cluster=None, box=None, mask=None, guidance_scale: Optional[float] = None,
                 num_steps: Optional[int] = None, sampler: Optional[str] = None, eta: Optional[float] = None,
                 generator=None, batch_size: Optional[int] = None, output_type: str = "pil",
                 progress: bool = True, spacing: Optional[str] = None):
        """Generate ``num_images`` images.

        cluster: int or one int per image ([N]; label and box guidance), ids in [0, K).
        box: normalized xyxy in [0, 1] (floats, [4] or [N, 4]), or a binary mask ([H, W] / [N, H, W], bool or
            integer 0/1) with the images' aspect ratio; box guidance needs ``cluster`` too (paper Eq. 8).
        mask: integer class map [H, W] / [N, H, W] (ids in [0, K), 255 = ignore) or a float/bool
            channel mask [K, H, W] / [N, K, H, W], any resolution with the images' aspect ratio (Eq. 9).
            Passing none of them samples unconditionally.
        guidance_scale: w of Eq. 4, eps = (1 - w) eps_uncond + w eps_cond (= eps_uncond + w (eps_cond -
            eps_uncond)); None takes ``sampler.guidance_scale`` of the config (2.0 by default). Must be
            left unset for an unguided model, and when no cluster / box / mask is given (unconditional
            samples, where w has no effect).
        num_steps, sampler (ddim | ddpm | dpmpp_2m), eta (ddim only, in [0, 1]), spacing (of the
            timesteps: linspace | leading | trailing | logsnr, see ``sampling_timesteps``): the solver;
            each one left unset comes from the model's ``sampler`` config (its eta and spacing only
            with its own sampler), else the sampler's default spacing: linspace for ddim and ddpm,
            logsnr for dpmpp_2m.
        generator: torch.Generator (or one per image); see the module docstring for reproducibility.
            None: a fresh random seed (torch's global generator is never drawn from).
        batch_size: images per network call (default all). output_type: ``pil`` (list of PIL images),
            ``pt`` (float [N, 3, H, W] in [0, 1]), ``np`` (float32 [N, H, W, 3] in [0, 1]) or ``latent``
            (diffusion-space latents [N, C, h, w]); all float32 on the CPU, moved there batch by batch.

        Precision: the UNet and autoencoder run in their own dtype (``to(dtype=...)``) or under an
        enclosing ``torch.autocast``; the sampler's latents stay float32 between steps.
        """
        num_images = _positive_int(num_images, "num_images")
        num_steps, sampler, eta, spacing = self.sampling_settings(num_steps, sampler, eta, spacing)
        batch_size = num_images if batch_size is None else _positive_int(batch_size, "batch_size")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        scale = self._guidance_scale(guidance_scale, any(v is not None for v in (cluster, box, mask)))
        inputs = parse_guidance(self.guidance, num_images, self.latent_shape[1:], self.image_size,
                                cluster=cluster, box=box, mask=mask)
        generators = per_image_generators(generator, num_images)
        timesteps = self.timesteps(num_steps, spacing)
        starts = range(0, num_images, batch_size)
        from tqdm.auto import tqdm

        outputs = []  # each batch goes to the CPU as it is done: the device holds one batch, not all N images
        with tqdm(total=len(starts) * num_steps, disable=not progress, desc="sampling") as bar:
            for lo in starts:
                hi = min(lo + batch_size, num_images)
                z = self._sample_batch(generators[lo:hi], *inputs.condition(lo, hi), scale, timesteps, sampler, eta,
                                       lambda *_: bar.update(1))
                outputs.append((z if output_type == "latent" else self._decode(z)).float().cpu())
        return _format(torch.cat(outputs), output_type)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images [b, 3, H, W] in [-1, 1] from latents, in the autoencoder's own device and dtype."""
        return self.autoencoder.decode_latents(z.to(next(self.autoencoder.parameters()).device))

    def _sample_batch(self, generators, cond, cond_map, scale, timesteps, sampler, eta, callback) -> torch.Tensor:
        """Latents [b, C, h, w] for one batch (its images' own generators), in the sampler's state dtype.

        The sampler's state x_t (and eps, x0_pred) is float32 (float64 for a float64 UNet) whatever
        the UNet's dtype: only the network runs in bf16 / fp16 (or autocast's dtype). In bf16 a DDIM
        update, x_t plus a small step, rounds to 8 bits of mantissa; over the paper's 250 steps that
        moved the latents by 12% (relative) from the float32 ones, 0.06% with a float32 state."""
        from sgdm.diffusion.noise import randn

        device, net_dtype = self.device, next(self.unet.parameters()).dtype
        dtype = torch.promote_types(net_dtype, torch.float32)
        x = randn((len(generators), *self.latent_shape), generators, device=device, dtype=dtype)
        move = lambda c: None if c is None else c.to(device=device, dtype=net_dtype)  # noqa: E731

        def eps_model(x_t, t, c, c_map):
            out = self.unet(x_t.to(net_dtype), t, c, c_map)
            # autocast returns bf16 even from a float32 UNet: eps joins the state in its dtype
            return eps_from_output(self.schedule, x_t, t, out.to(x_t.dtype), self.diffusion.parameterization)

        denoise = ClassifierFreeGuidance(eps_model, move(cond), move(cond_map), scale)
        kwargs = {"callback": callback}
        if sampler in ("ddim", "ddpm"):
            kwargs["generator"] = generators
        if sampler == "ddim":
            kwargs["eta"] = float(eta)
        return get_sampler(sampler)(denoise, x, timesteps, self.schedule, **kwargs)


def _format(samples: torch.Tensor, output_type: str):
    """Latents as they are; images [N, 3, H, W] in [-1, 1] as pt / np / pil in [0, 1]."""
    if output_type == "latent":
        return samples
    images = ((samples + 1) / 2).clamp(0, 1)
    if output_type == "pt":
        return images
    if output_type == "np":
        return images.permute(0, 2, 3, 1).numpy()
    from PIL import Image

    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]


# --------------------------------------------------------------------- files
def _weights_file(path: pathlib.Path) -> pathlib.Path:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a pipeline directory or a .safetensors file")
        return path
    if path.is_dir():
        for candidate in (path / WEIGHTS_NAME, path / "pipeline" / WEIGHTS_NAME):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} there nor in {path / 'pipeline'} (training writes it "
                                f"there when it finishes, or call SelfGuidedPipeline.save_pretrained)")
    raise FileNotFoundError(f"{path}: no such file or directory")


def _read_weights(file: pathlib.Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors file; a damaged or truncated one is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: cannot be read as a safetensors file (damaged or truncated?): {err}") from None


def empty_modules(model: ModelConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(UNet, AutoencoderKL) of ``model`` with no storage (on the meta device), for weights that
    :func:`assign_state` gives them: random initialisation took half of loading a 323M-parameter
    UNet (3.7 of 7.4 s on a CPU) and held a second copy of every weight while they were copied in."""
    from sgdm.models.autoencoder import AutoencoderKL
    from sgdm.models.unet import UNet

    with torch.device("meta"):
        return UNet(model.unet, *condition_dims(model.guidance)), AutoencoderKL(model.autoencoder)


def assign_state(module: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    """Load ``state`` into a module from :func:`empty_modules` by taking its tensors (no copy unless
    the dtype differs: each becomes the dtype the module was built with, or it was read under
    ``torch.inference_mode``: such weights could never be trained). Returns (missing, unexpected)
    keys; a shape that does not fit raises RuntimeError, as ``load_state_dict`` does."""
    own = module.state_dict()
    with torch.inference_mode(False):
        state = {k: v.to(own[k].dtype) if k in own and v.dtype != own[k].dtype else v.clone() if v.is_inference()
                 else v for k, v in state.items()}
        return module.load_state_dict(state, strict=False, assign=True)


def _load_prefixed(module: torch.nn.Module, tensors: dict, prefix: str, file: pathlib.Path) -> None:
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    if not state:
        raise ValueError(f"{file}: holds no '{prefix}.*' tensors")
    try:
        missing, unexpected = assign_state(module, state)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{file}: the {prefix} weights do not fit the {prefix} config stored with them: "
                         f"{err}") from None
    if missing or unexpected:
        raise ValueError(f"{file}: the {prefix} weights do not match its config: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")


# --------------------------------------------------------------------- guidance inputs
def _as_tensor(value, name: str, what: str) -> torch.Tensor:
    """Tensors as they are; numbers, (nested) lists, numpy arrays and PIL images as tensors. Anything
    else (a string, a ragged list) is a ValueError naming the argument ``name`` and saying ``what`` it takes."""
    if isinstance(value, torch.Tensor):
        return _signed(value)
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":  # strings, objects: torch.as_tensor's TypeError names nothing
            raise TypeError(array.dtype)
        return _signed(torch.as_tensor(array if array.flags.writeable else array.copy()))  # PIL: read-only arrays
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {what}, got {value!r:.200}") from None


def _signed(t: torch.Tensor) -> torch.Tensor:
    """uint16/32/64 (16-bit PNGs, numpy arrays) as int64: torch compares and indexes only uint8 of the
    unsigned types."""
    return t.long() if t.dtype in (torch.uint16, torch.uint32, torch.uint64) else t


def _expand(t: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """One item for all images (a view, no copy), or one per image."""
    if t.shape[0] == 1:
        return t.expand(n, *t.shape[1:])
    if t.shape[0] != n:
        raise ValueError(f"{name}: got {t.shape[0]} items for num_images={n}; pass one, or one per image")
    return t


def _covers(hw, image_hw) -> bool:
    """Whether a map of size ``hw`` covers images of ``image_hw`` (same aspect ratio)."""
    return hw[0] >= 1 and hw[1] >= 1 and hw[0] * image_hw[1] == hw[1] * image_hw[0]


def _check_covers_image(hw, image_hw, latent_hw, name: str) -> None:
    if not _covers(hw, image_hw):
        raise ValueError(f"{name}: size {tuple(hw)} does not fit the {image_hw[0]}x{image_hw[1]} output images: it "
                         f"must cover the image (same aspect ratio, any resolution; it is resized to the "
                         f"{latent_hw[0]}x{latent_hw[1]} latent grid)")


def _check_ids(ids: torch.Tensor, k: int, name: str, ignore: Optional[int] = None) -> None:
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer ids, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= k)
    if ignore is not None:
        bad &= ids != ignore
    if bool(bad.any()):
        what, extra = ("class id", f" and not the ignore label {ignore}") if ignore is not None else ("id", "")
        raise ValueError(f"{name}: {what} {int(ids[bad][0])} is outside [0, {k}) (K={k}){extra}")


@dataclass
class GuidanceInputs:
    """The user's guidance for N images, checked once and expanded to N (views); the UNet's
    (cond, cond_map) are built per batch by :meth:`condition`, so a mask-guided run over many
    images never holds all K-channel maps at once. At most one spatial field is set."""

    kind: str
    num_classes: int
    latent_hw: tuple[int, int]
    clusters: Optional[torch.Tensor] = None  # [N] int64 ids (label, box)
    boxes: Optional[torch.Tensor] = None  # [N, 4] normalized xyxy
    box_masks: Optional[torch.Tensor] = None  # [N, H, W] binary
    class_maps: Optional[torch.Tensor] = None  # [N, H, W] ids, 255 = ignore
    channel_masks: Optional[torch.Tensor] = None  # [N, K, H, W] in [0, 1], not one-hot (those are class_maps)

    def condition(self, lo: int, hi: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(cond [b, K] | None, cond_map [b, C, h, w] | None) for images lo..hi-1 (None, None: unconditional)."""
        k, hw = self.num_classes, tuple(self.latent_hw)
        if self.class_maps is not None:
            ids = self.class_maps[lo:hi]
            return _present_classes(ids, k), class_map_one_hot(ids, k, size=hw)
        if self.channel_masks is not None:  # soft masks: coverage fractions when shrinking
            hot = self.channel_masks[lo:hi].float()
            shrink = hw[0] <= hot.shape[-2] and hw[1] <= hot.shape[-1]
            return multi_hot(hot), F.interpolate(hot, size=hw, mode="area" if shrink else "nearest-exact")
        if self.clusters is None:
            return None, None
        cond = one_hot(self.clusters[lo:hi], k)
        if self.boxes is not None:
            return cond, box_mask(self.boxes[lo:hi], *hw)
        if self.box_masks is not None:
            # a latent cell is on when any pixel in it is: the same overlap rule box_mask uses
            return cond, F.adaptive_max_pool2d(self.box_masks[lo:hi].float()[:, None], hw)
        return cond, None


def _present_classes(ids: torch.Tensor, k: int) -> torch.Tensor:
    """Multi-hot [b, K] of checked class maps [b, H, W] (255 = ignore), from the full-resolution map
    since small regions may vanish on the latent grid (Eq. 9): ``multi_hot(class_map_one_hot(ids, K))``
    by the annotation store's scatter of the ids, on their device, instead of a [b, K, H, W] one-hot
    (64 maps of 256 px, K = 27: 0.09 s instead of 6.9 s and 453 MB on a CPU)."""
    from sgdm.annotation.store import multi_hot_from_masks

    return multi_hot_from_masks(ids, k)


def _parse_box(box, n: int, latent_hw, image_hw) -> dict:
    """Boxes are a [4] vector or a floating-point [N, 4]; any other bool or integer [H, W] or
    [N, H, W] is a box mask (a 4-pixel-wide mask must be bool or integer, not float)."""
    b = _as_tensor(box, "box", "normalized xyxy numbers or a binary box mask")
    if b.dim() == 1 and b.shape[0] == 4 and b.dtype != torch.bool or b.dim() == 2 and b.shape[1] == 4 and (
            b.is_floating_point()):
        boxes = _expand(b.double().reshape(-1, 4), n, "box")
        x0, y0, x1, y1 = boxes.unbind(1)
        # written so that NaN fails it
        ok = (x0 >= 0) & (y0 >= 0) & (x1 <= 1) & (y1 <= 1) & (x0 < x1) & (y0 < y1)
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0])
            # one [4] box is never a mask; only an [N, 4] could have been meant as a 4-pixel-wide one
            name, hint = ("box", "") if b.dim() == 1 else (f"box[{i}]", " (a 4-pixel-wide box mask must be "
                                                                        "bool or integer, not float)")
            raise ValueError(f"{name}: expected normalized xyxy with 0 <= x0 < x1 <= 1 and "
                             f"0 <= y0 < y1 <= 1, got {boxes[i].tolist()}{hint}")
        return {"boxes": boxes.float()}
    m = b[:, 0] if b.dim() == 4 and b.shape[1] == 1 else (b[None] if b.dim() == 2 else b)
    if m.dim() != 3:
        raise ValueError(f"box: expected xyxy [4] / [N, 4] or a binary mask [H, W] / [N, H, W], got shape "
                         f"{tuple(b.shape)}")
    if b.dim() == 2 and b.shape[1] == 4 and b.dtype != torch.bool and not _covers(b.shape, image_hw):
        # [[0, 0, 1, 1]]: whole-image boxes written with integers, not a mask 4 pixels wide
        raise ValueError(f"box: got integers of shape {tuple(b.shape)}; boxes [N, 4] are normalized xyxy floats "
                         f"(write 1.0, not 1), and a box mask [H, W] must have the "
                         f"{image_hw[0]}x{image_hw[1]} images' aspect ratio")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("box: a box mask must be binary (bool or 0/1 values)")
    _check_covers_image(m.shape[-2:], image_hw, latent_hw, "box")
    empty = (m.flatten(1) == 0).all(1)
    if bool(empty.any()):  # training pairs every cluster id with a box; the null condition is zeros for both
        name = "box" if m.shape[0] == 1 else f"box[{int(empty.nonzero()[0])}]"
        raise ValueError(f"{name}: the box mask is empty; a box-guided model saw a box with every cluster id "
                         f"in training (guidance_scale=0 samples without guidance)")
    return {"box_masks": _expand(m, n, "box")}


def _parse_mask(mask, k: int, n: int, latent_hw, image_hw) -> dict:
    m = _as_tensor(mask, "mask", "an integer class map or a channel mask (tensor, numpy array or PIL image)")
    if not (m.is_floating_point() or m.dtype == torch.bool):
        ids = m[None] if m.dim() == 2 else m
        if ids.dim() != 3:
            raise ValueError(f"mask: a class-id map must be [H, W] or [N, H, W], got shape {tuple(m.shape)}")
        if m.dim() == 3 and m.shape[-1] in (3, 4) and _covers(m.shape[:2], image_hw) and not _covers(
                m.shape[1:], image_hw):  # an [H, W, C] picture, not C-pixel-wide maps
            raise ValueError(f"mask: got shape {tuple(m.shape)}, a colour (RGB / RGBA) image; a class map holds "
                             f"one class id per pixel: [H, W] or [N, H, W] (as a PNG: single-channel, mode L, P "
                             f"or I;16)")
        _check_covers_image(ids.shape[-2:], image_hw, latent_hw, "mask")
        _check_ids(ids, k, "mask", ignore=IGNORE_INDEX)
        return {"class_maps": _expand(ids, n, "mask")}
    hot = m[None] if m.dim() == 3 else m
    if hot.dim() != 4 or hot.shape[1] != k:
        raise ValueError(f"mask: a channel mask must be [K, H, W] or [N, K, H, W] with K={k}, got shape "
                         f"{tuple(m.shape)}")
    _check_covers_image(hot.shape[-2:], image_hw, latent_hw, "mask")
    if not bool(((hot >= 0) & (hot <= 1)).all()):  # NaN fails it too
        raise ValueError("mask: channel values must lie in [0, 1] (NaN is not a value)")
    covered = hot.sum(1)
    if bool((((hot == 0) | (hot == 1)).all() & (covered <= 1).all())):
        # one-hot (all-zero: ignored): the class ids it encodes, so it is resized as an id map is
        ids = torch.where(covered > 0, (hot.byte() if hot.dtype == torch.bool else hot).argmax(1),
                          IGNORE_INDEX)  # argmax takes no bool
        return {"class_maps": _expand(ids, n, "mask")}
    return {"channel_masks": _expand(hot, n, "mask")}


_INPUTS = {"none": (), "label": ("cluster",), "box": ("cluster", "box"), "mask": ("mask",)}


def parse_guidance(guidance: GuidanceConfig, num_images: int, latent_hw: Sequence[int], image_hw: Sequence[int],
                   cluster=None, box=None, mask=None) -> GuidanceInputs:
    """Check the user's cluster / box / mask against the model's guidance; errors name the argument."""
    given = [name for name, value in (("cluster", cluster), ("box", box), ("mask", mask)) if value is not None]
    allowed = _INPUTS[guidance.kind]
    for name in given:
        if name not in allowed:
            takes = " and ".join(allowed) if allowed else "no guidance inputs"
            raise ValueError(f"{name}: this model has {guidance.kind!r} guidance (model.guidance.kind); it takes "
                             f"{takes}")
    k, n = guidance.num_classes, num_images
    out = GuidanceInputs(guidance.kind, k, tuple(latent_hw))
    if not given:
        return out
    if guidance.kind == "mask":
        return replace(out, **_parse_mask(mask, k, n, latent_hw, image_hw))
    if guidance.kind == "box" and len(given) == 1:
        missing = "box" if given == ["cluster"] else "cluster"
        raise ValueError(f"{missing}: box guidance (paper Eq. 8) takes a box together with its cluster id; "
                         f"pass both (or neither, for unconditional samples)")
    ids = _as_tensor(cluster, "cluster", "an integer cluster id or one per image")
    if ids.dim() > 1:  # a one-hot row or an [N, 1] column would otherwise be read as that many ids
        raise ValueError(f"cluster: expected one id or one id per image ([N]), got shape {tuple(ids.shape)}")
    ids = ids.reshape(-1)
    if ids.numel() == 0:  # [] is a float64 array: say that no id came, not that its dtype is wrong
        _expand(ids, n, "cluster")
    _check_ids(ids, k, "cluster")
    out = replace(out, clusters=_expand(ids, n, "cluster"))
    return out if box is None else replace(out, **_parse_box(box, n, latent_hw, image_hw))


def build_condition(guidance: GuidanceConfig, num_images: int, latent_hw: Sequence[int], image_hw: Sequence[int],
                    cluster=None, box=None, mask=None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(cond [N, K] | None, cond_map [N, C, h, w] | None) for all images at once (see :func:`parse_guidance`)."""
    return parse_guidance(guidance, num_images, latent_hw, image_hw, cluster, box, mask).condition(0, num_images)
