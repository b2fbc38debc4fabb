"""``sgdm-ldm sample RUN``: images from a trained run (its exported EMA pipeline) as a PNG grid or files."""
from __future__ import annotations

import argparse
import pathlib
import re
import sys
from typing import get_args

from sgdm.cli.arguments import check_output, positive_int, take_negative_numbers
from sgdm.diffusion.config import SAMPLERS, Spacing  # light: no torch

DESCRIPTION = """Sample from a trained self-guided LDM with SelfGuidedPipeline. RUN is a training run
directory (its pipeline/ export), a pipeline directory or a .safetensors file. A run that has not
exported its pipeline yet (stopped, or still training), or has checkpoints newer than its export (a
finished run continued with a higher train.max_steps), is sampled from the EMA weights of its newest
valid checkpoint, as is a checkpoint named directly (RUN/checkpoints/step-*.ckpt).

Guidance (paper Eq. 4, eps = (1 - w) eps_uncond + w eps_cond): --cluster for label guidance (and the
box's cluster for box guidance), --box for box guidance, --mask for mask guidance; none of them samples
unconditionally (then without --guidance-scale, which has no effect there). --out ending in .png writes
one grid; otherwise a folder of numbered PNG files."""


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected 4 numbers x0,y0,x1,y1 in [0, 1], got {len(values)}")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="sample images from a trained run or .safetensors file",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=pathlib.Path,
                   help="run directory, pipeline directory, .safetensors file, or a run's checkpoint "
                        "(RUN/checkpoints/step-*.ckpt); a run that has not exported its pipeline yet, or "
                        "has checkpoints newer than its export, is sampled from the EMA weights of its newest "
                        "valid checkpoint")
    p.add_argument("--num-images", "-n", type=positive_int, default=8, help="how many images (default 8)")
    p.add_argument("--cluster", type=int, nargs="+", default=None,
                   help="cluster id(s) in [0, K): one for all images or one per image")
    p.add_argument("--box", type=_floats, default=None, metavar="X0,Y0,X1,Y1",
                   help="box guidance: normalised xyxy box (needs --cluster)")
    p.add_argument("--mask", type=pathlib.Path, default=None,
                   help="mask guidance: a class map (.png with ids in [0, K), 255 = ignore, or .npy/.pt)")
    p.add_argument("--guidance-scale", "-w", type=float, default=None,
                   help="w of Eq. 4 (default: the run's sampler.guidance_scale)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the run's sampler.steps)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="solver (default: the run's sampler.sampler)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta in [0, 1] (default: the run's sampler.eta with its sampler, else 0)")
    p.add_argument("--spacing", choices=get_args(Spacing), default=None,
                   help="timesteps (default: the run's sampler.spacing with its sampler, else linspace for "
                        "ddim / ddpm and logsnr for dpmpp_2m)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the CPU generator (same seed, same images)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per network call (default: all)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--compile", action="store_true",
                   help="run the UNet under torch.compile: the first batch compiles (seconds to minutes), "
                        "worth it for many images")
    p.add_argument("--per-row", type=positive_int, default=8, help="images per grid row (default 8)")
    p.add_argument("--out", "-o", type=pathlib.Path, default=pathlib.Path("samples.png"),
                   help="a .png grid, or a folder for one PNG per image (default samples.png)")
    take_negative_numbers(p)
    p.set_defaults(func=run)
    return p


# the pipeline's parameter names -> this command's flags, for its error messages
_FLAGS = {"num_images": "--num-images", "num_steps": "--steps", "guidance_scale": "--guidance-scale",
          "batch_size": "--batch-size", "cluster": "--cluster", "box": "--box", "mask": "--mask", "eta": "--eta",
          "sampler": "--sampler", "spacing": "--spacing"}


# parameter names that are no English word, so also said as flags inside a message ("leave guidance_scale unset")
_IDENTIFIERS = re.compile(r"\b(" + "|".join(name for name in _FLAGS if "_" in name) + r")\b")
# the guidance inputs a model takes, listed at the end of a message ("it takes cluster and box")
_TAKES = re.compile(r"(it takes )((?:cluster|box|mask)(?: and (?:cluster|box|mask))*)$")


def _flag_names(message: str) -> str:
    """A pipeline error as this command says it: a leading ``name:`` (or ``name[i]:``) as its flag, the
    parameter names with an underscore wherever they appear, and the guidance inputs a model takes."""
    head, sep, rest = message.partition(":")
    name = head.split("[")[0]
    if not (sep and name in _FLAGS):
        return message
    rest = _IDENTIFIERS.sub(lambda m: _FLAGS[m.group(1)], rest)
    rest = _TAKES.sub(lambda m: m.group(1) + re.sub(r"\b(cluster|box|mask)\b", lambda w: _FLAGS[w.group(1)],
                                                    m.group(2)), rest)
    return f"{_FLAGS[name]}{head[len(name):]}{sep}{rest}"


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^63), got {value}")
    return value


def _load_mask(path: pathlib.Path):
    import numpy as np
    import torch

    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"--mask: file {path} does not exist")
    try:
        if path.suffix == ".npy":
            mask = torch.from_numpy(np.load(path))
        elif path.suffix == ".pt":
            mask = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with Image.open(path) as image:
                if image.mode not in ("L", "P", "1") and not image.mode.startswith("I"):
                    raise ValueError(f"an image of mode {image.mode} is not a class map; save the class ids as a "
                                     f"single-channel (L, P or 16-bit) PNG")
                mask = torch.from_numpy(np.array(image).astype(np.int64))
    except (OSError, ValueError, EOFError, RuntimeError, TypeError) as err:  # truncated, not an image, not a
        # tensor file; TypeError: an .npy of strings or objects, which torch.from_numpy cannot take
        raise ValueError(f"--mask: {path} cannot be read as a class map: {err}") from None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"--mask: {path} holds a {type(mask).__name__}, not a tensor (save the class map "
                         f"itself with torch.save)")
    if (mask.is_floating_point() or mask.dtype == torch.bool) and mask.dim() == 2:
        raise ValueError(f"--mask: {path} holds a 2-D {mask.dtype} array; a class map holds integer ids "
                         f"(a channel mask is [K, H, W])")
    return mask


def _check_out(out: pathlib.Path) -> None:
    """``--out`` before sampling: a .png grid, or a folder (a name with another image suffix is neither)."""
    from sgdm.config.core import ConfigError
    from sgdm.data.decode import IMAGE_EXTENSIONS

    suffix = out.suffix.lower()
    if suffix in IMAGE_EXTENSIONS and suffix != ".png":
        raise ConfigError("--out", f"{out}: sample writes a .png grid, or a folder of PNG files; name a .png file "
                                   f"({out.with_suffix('.png')}) or a folder")
    check_output(out, "--out", folder=suffix != ".png")


def run(args: argparse.Namespace) -> int:
    from sgdm.config.core import ConfigError

    _check_out(args.out)
    try:
        images = _sample(args)
    except (FileNotFoundError, ValueError) as err:  # bad input, named by the message; ConfigError: main()
        if isinstance(err, ConfigError):
            raise
        print(f"sgdm-ldm sample: error: {err}", file=sys.stderr)
        return 1
    from sgdm.training.sample_grid import save_grid

    if args.out.suffix.lower() == ".png":
        save_grid(images, args.per_row, args.out)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            save_grid(image[None], 1, args.out / f"{i:05d}.png")
    print(f"wrote {args.num_images} image{'' if args.num_images == 1 else 's'} to {args.out}")
    return 0


def _load_pipeline(path: pathlib.Path, device):
    """The exported pipeline at ``path``, else the one a checkpoint of the run would export (said on stderr)."""
    from sgdm.pipeline import SelfGuidedPipeline
    from sgdm.training.export import checkpoint_for, pipeline_from_checkpoint

    ckpt = checkpoint_for(path)
    if ckpt is None:
        return SelfGuidedPipeline.from_pretrained(path, device=device)
    pipe, step = pipeline_from_checkpoint(ckpt)
    print(f"sampling from the EMA weights of {ckpt} (step {step}): no exported pipeline used", file=sys.stderr)
    return pipe.to(device)


def _sample(args: argparse.Namespace):
    """The images the arguments ask for, in [-1, 1]."""
    import torch

    from sgdm.devices import resolve_device

    device = resolve_device(args.device, "--device")
    mask = None if args.mask is None else _load_mask(args.mask)
    pipe = _load_pipeline(args.run, device)
    if args.compile:
        pipe.compile()
    cluster = None if args.cluster is None else (args.cluster[0] if len(args.cluster) == 1 else args.cluster)
    try:  # unset solver options come from the run's sampler config (pipeline defaults)
        images = pipe(args.num_images, cluster=cluster, box=args.box, mask=mask, guidance_scale=args.guidance_scale,
                      num_steps=args.steps, sampler=args.sampler, eta=args.eta, spacing=args.spacing,
                      generator=torch.Generator().manual_seed(args.seed), batch_size=args.batch_size,
                      output_type="pt", progress=True)
    except ValueError as err:  # the pipeline names its parameters; say the flags
        raise ValueError(_flag_names(str(err))) from None
    return images * 2 - 1  # pipeline "pt" output is in [0, 1]; the grid takes [-1, 1]
