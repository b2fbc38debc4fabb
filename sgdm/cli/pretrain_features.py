"""``sgdm-ldm pretrain-features CONFIG``: DINO self-distillation on the config's unlabeled images."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

from sgdm.cli.arguments import add_config_arguments, check_output


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pretrain-features",
        help="DINO-style self-supervised feature pretraining",
        description=(
            "Train the annotation backbone (annotation.backbone + annotation.backbone_kwargs, any timm "
            "architecture) on the images of data: with DINO self-distillation (student + EMA teacher, "
            "multi-crop, centering and sharpening; budget in prepare.pretrain). The teacher is saved in "
            "timm's layout to annotation.weights (or --out), where `sgdm-ldm annotate` loads it."
        ),
    )
    add_config_arguments(parser, reads="its data:, annotation: and prepare.pretrain sections",
                         example="prepare.pretrain.steps=100")
    parser.add_argument("--out", default=None, help="output .safetensors/.pth file (default: annotation.weights)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from sgdm.config.core import load_config
    from sgdm.config.schema import ExperimentConfig
    from sgdm.features_pretrain.run import pretrain_from_config

    _check_one_process()
    cfg = load_config(ExperimentConfig, args.config, args.overrides)
    if args.out is not None:
        _check_out(pathlib.Path(args.out))
    _check_new(cfg, args.out)
    from sgdm.features_pretrain.train import PretrainStopped

    try:
        path = pretrain_from_config(cfg, args.out)
    except PretrainStopped as stopped:  # SIGTERM, its checkpoint written: exit as `sgdm-ldm train` does
        from sgdm.training.run import EXIT_SIGTERM

        print(f"sgdm: {stopped}", file=sys.stderr, flush=True)
        return EXIT_SIGTERM
    print(f"saved encoder to {path}")
    return 0


def _check_out(out: pathlib.Path) -> None:
    """``--out`` before the training: a weights file name that can be written."""
    from sgdm.config.core import ConfigError
    from sgdm.features_pretrain.train import WEIGHT_SUFFIXES

    if out.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError("--out", f"{out}: the encoder is saved as a {', '.join(WEIGHT_SUFFIXES)} file")
    check_output(out, "--out")


def _check_new(cfg, out) -> None:
    """The encoder goes to a new file: ``annotation.weights`` is often DINO's downloaded weights (the paper
    configs), which a few hundred steps of pretraining would replace for good (as ``train-autoencoder``, this
    command never overwrites). An interrupted run has not written its file yet, so it still continues."""
    from sgdm.config.core import ConfigError

    target = pathlib.Path(out) if out is not None else cfg.annotation.weights
    if target is not None and target.exists():
        raise ConfigError("--out" if out is not None else "annotation.weights",
                          f"{target} exists (the encoder annotate reads: downloaded DINO weights, or an earlier "
                          f"pretraining); pretrain-features never replaces a file: write to a new one with --out "
                          f"(then annotation.weights=<it> for annotate), or delete this one")


def _check_one_process() -> None:
    """Refuse a launch of several processes (torchrun, srun, or ``WORLD_SIZE`` > 1 as :func:`sgdm.launch.
    join_process_group` reads it): pretraining is one process's work, and each would train the same encoder from
    the same seed and write the same file."""
    from sgdm.config.core import ConfigError
    from sgdm.launch import current

    launch = current()
    world = launch.world_size
    if launch.launcher == "none" and os.environ.get("WORLD_SIZE", "").strip().isdigit():
        world = int(os.environ["WORLD_SIZE"])
    if world > 1:
        variable = "SLURM_NTASKS" if launch.launcher == "srun" else "WORLD_SIZE"
        by = f"{launch.launcher} started" if launch.launcher in ("torchrun", "srun") else "this is one of"
        raise ConfigError(variable, f"pretrain-features trains in one process, but {by} {world} processes "
                                    f"({variable}={world}): "
                                    "each would train the same encoder and write the same file; run it once, without "
                                    "the launcher (prepare.pretrain.device picks its device)")
