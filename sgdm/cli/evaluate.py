"""``sgdm-ldm eval RUN``: FID / IS / KID, fd_<extractor> and layout adherence of a trained run."""
from __future__ import annotations

import argparse
import sys
from typing import get_args

from sgdm.cli.arguments import take_negative_numbers
from sgdm.diffusion.config import SAMPLERS, Spacing  # light: no torch

# CLI flag -> eval config key (None values are left as the run's eval: section has them)
_FLAGS = {
    "n": "n", "batch_size": "batch_size", "sampler": "sampler", "steps": "steps", "eta": "eta", "spacing": "spacing",
    "guidance_scale": "guidance_scale", "inception_weights": "inception_weights",
    "feature_extractor": "feature_backbone", "feature_weights": "feature_weights", "feature_name": "feature_name",
    "seed": "seed", "device": "device", "compile": "compile", "reference_n": "reference_n",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="FID / IS / KID and layout adherence of a trained run",
        description=(
            "Sample RUN with its EMA weights (conditions drawn from the training annotations) and measure: "
            "FID, IS, KID through torch-fidelity (Inception weights downloaded when online, or "
            "--inception-weights PATH), the Frechet distance in an sgdm feature extractor's space (reported "
            "as fd_<name>, not FID; default extractor: the run's annotation backbone), and for box / mask "
            "guidance the IoU / mIoU of the self-annotation of generated images with the guiding layout. "
            "Defaults come from the run's eval: section (its config.yaml). Writes RUN/eval/results.json, "
            "results.md and, with --sweep-scale, sweep.png. Started by torchrun (torchrun --nproc-per-node 8 -m "
            "sgdm.cli.main eval RUN) or srun, the processes share the sampling, each on its own GPU, and the "
            "first one measures and writes the same results as one process (the others hand it their "
            "samples through RUN/eval/.rank-samples/, deleted afterwards)."
        ),
    )
    parser.add_argument("run", help="training run directory (holds config.yaml and pipeline/)")
    parser.add_argument("--n", "--num-samples", dest="n", type=int,
                        help="number of generated images (default: the run's eval.n); under torchrun write "
                             "--num-samples: torchrun reads --n as an abbreviation of its own options")
    parser.add_argument("--batch-size", type=int, help="sampling / feature batch size (default: eval.batch_size, at most --n)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="sampler (default: eval.sampler)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: eval.steps)")
    parser.add_argument("--eta", type=float, help="DDIM eta in [0, 1] (default: eval.eta)")
    parser.add_argument("--spacing", choices=get_args(Spacing),
                        help="timesteps: linspace (T - 1 down to 1), leading (LDM's), trailing or logsnr (default: "
                             "eval.spacing, else the run's sampler.spacing with its sampler, else linspace for "
                             "ddim / ddpm and logsnr for dpmpp_2m)")
    parser.add_argument("--guidance-scale", type=float, help="w of paper Eq. 4 (default: eval.guidance_scale)")
    parser.add_argument("--sweep-scale", help="comma-separated guidance scales, e.g. 0,1,2,4; plots metric vs scale")
    parser.add_argument("--metrics", help="comma-separated subset of fid,is,kid,fd,adherence (default: eval.metrics)")
    parser.add_argument("--inception-weights",
                        help="the FID Inception's weights file, for offline use: torch-fidelity's "
                             "weights-inception-2015-12-05-6726825d.pth or pytorch-fid's "
                             "pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--feature-extractor",
                        help="timm backbone name for fd_<name> (default: eval.feature_backbone, else the run's "
                             "annotation.backbone with its annotation.backbone_kwargs)")
    parser.add_argument("--feature-backbone-kwargs", metavar="YAML",
                        help="keyword arguments that build --feature-extractor, as a YAML mapping, e.g. "
                             "'{embed_dim: 192, depth: 4, patch_size: 8, img_size: 64, num_heads: 3}' for a small "
                             "encoder (default: eval.feature_backbone_kwargs; none when --feature-extractor is given)")
    parser.add_argument("--feature-weights", help="weights file of --feature-extractor")
    parser.add_argument("--feature-name", help="name the distance is reported under (fd_<name>)")
    parser.add_argument("--reference-n", type=int,
                        help="real images the distances compare with: the first N readable training images "
                             "(default: eval.reference_n)")
    parser.add_argument("--seed", type=int, help="seed of the conditions and the sampling noise (default: eval.seed)")
    parser.add_argument("--device", help="auto, cpu or cuda[:N] (default: eval.device); under torchrun or srun, "
                                         "auto and cuda are each process's own GPU")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="sample with the UNet under torch.compile: the first batch compiles (default: "
                             "eval.compile)")
    take_negative_numbers(parser)
    parser.set_defaults(func=run)
    return parser


def _float_list(text: str, flag: str) -> list[float]:
    from sgdm.config.core import ConfigError

    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(flag, f"expected comma-separated numbers, got {text!r}") from None


def _yaml_mapping(text: str, flag: str, key: str):
    """``text``, the value of ``flag`` (which sets ``key``), read as an override's value is (YAML, numbers as
    YAML 1.2 reads them); from_dict then checks that it is a mapping."""
    from sgdm.config.core import ConfigError, apply_overrides

    try:
        return apply_overrides({}, [f"value={text}"])["value"]
    except ConfigError as err:
        raise ConfigError(f"{flag} ({key})", err.message.replace("override value", "value")) from None


def eval_config_from_args(run_eval: dict, args) -> "EvalConfig":  # noqa: F821
    """The run's ``eval:`` section with the command-line flags applied, validated once."""
    from sgdm.config.core import from_dict
    from sgdm.evaluation.config import EvalConfig

    data = dict(run_eval)
    for flag, key in _FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            data[key] = value
    batch_size = data.get("batch_size", EvalConfig.batch_size)
    if args.n is not None and args.batch_size is None and isinstance(batch_size, int) and 2 <= args.n < batch_size:
        data["batch_size"] = args.n  # a small --n is one batch, not a conflict with the run's eval.batch_size
    if args.feature_extractor is not None:
        data["feature_backbone_kwargs"] = {}  # the run's kwargs build the run's extractor, not this one
    if args.feature_backbone_kwargs is not None:
        data["feature_backbone_kwargs"] = _yaml_mapping(args.feature_backbone_kwargs, "--feature-backbone-kwargs",
                                                        "eval.feature_backbone_kwargs")
    if args.sweep_scale is not None:
        data["sweep_scales"] = _float_list(args.sweep_scale, "--sweep-scale")
    if args.metrics is not None:
        data["metrics"] = [m.strip() for m in args.metrics.split(",") if m.strip()]
    from sgdm.config.core import ConfigError

    try:
        ecfg = from_dict(EvalConfig, data, "eval")
    except ConfigError as err:  # a value the user typed: name the flag
        given = {f"eval.{key}": "--" + flag.replace("_", "-") for flag, key in _FLAGS.items()
                 if getattr(args, flag) is not None}
        given.update({"eval.sweep_scales": "--sweep-scale"} if args.sweep_scale is not None else {})
        given.update({"eval.metrics": "--metrics"} if args.metrics is not None else {})
        given.update({"eval.feature_backbone_kwargs": "--feature-backbone-kwargs"}
                     if args.feature_backbone_kwargs is not None else {})
        name = next((flag for key, flag in given.items() if err.key == key or err.key.startswith(key + ".")
                     or err.key.startswith(key + "[")), None)
        if name is None:
            raise
        raise ConfigError(f"{name} ({err.key})", err.message) from None
    if args.feature_backbone_kwargs is not None and ecfg.feature_backbone is None:
        raise ConfigError("--feature-backbone-kwargs", "builds eval's own extractor, and neither --feature-extractor "
                                                       "nor the run's eval.feature_backbone names one (the distance "
                                                       "would use annotation.backbone with annotation.backbone_kwargs); "
                                                       "give --feature-extractor NAME too")
    from sgdm.evaluation.evaluate import INCEPTION

    # a file or extractor typed on the command line that no requested metric reads was ignored without a word
    if args.inception_weights is not None and not set(INCEPTION) & set(ecfg.metrics):
        raise ConfigError("--inception-weights", f"only fid, is and kid read the Inception weights, and the metrics "
                                                 f"are {ecfg.metrics}; add them with --metrics "
                                                 f"{','.join([*ecfg.metrics, 'fid'])}")
    for flag in ("feature_extractor", "feature_weights", "feature_backbone_kwargs"):
        if getattr(args, flag) is not None and "fd" not in ecfg.metrics:
            raise ConfigError("--" + flag.replace("_", "-"), f"only fd reads the feature extractor, and the metrics "
                                                            f"are {ecfg.metrics}; add it with --metrics "
                                                            f"{','.join([*ecfg.metrics, 'fd'])}")
    return ecfg


def run(args) -> int:
    import pathlib

    from sgdm.config.core import load_yaml
    from sgdm.evaluation.evaluate import evaluate_run
    from sgdm.launch import process_group

    config = pathlib.Path(args.run) / "config.yaml"
    if not config.is_file():
        print(f"sgdm-ldm eval: RUN {args.run}: no config.yaml there; pass a training run directory", file=sys.stderr)
        return 2
    ecfg = eval_config_from_args(load_yaml(config).get("eval") or {}, args)  # on every rank, before any collective
    from sgdm.config.core import ConfigError

    try:
        with process_group(ecfg.device):  # one process unless torchrun or srun started several
            results = evaluate_run(args.run, ecfg)
    except (FileNotFoundError, RuntimeError, ValueError) as err:  # ConfigError: main() reports it (exit 2)
        if isinstance(err, ConfigError):
            if err.key.startswith("data.") and not err.where:  # the run's data section: eval takes no overrides
                raise ConfigError(err.key, err.message, f"recorded in {config}; edit it there if the data has "
                                                        "moved") from None
            raise
        print(f"sgdm-ldm eval: {err}", file=sys.stderr)
        return 1
    if results is None:  # not the first of several processes: it wrote and prints nothing
        return 0
    print((pathlib.Path(results["run"]) / "eval" / "results.md").read_text())
    return 0
