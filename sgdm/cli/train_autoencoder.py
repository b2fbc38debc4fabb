"""``sgdm-ldm train-autoencoder CONFIG [key=value ...]``: train the KL autoencoder (first stage)."""
from __future__ import annotations

import argparse

DESCRIPTION = """Train the KL autoencoder (LDM's first stage) of an experiment config with LDM's losses
(L1 + LPIPS + KL, hinge PatchGAN from model.autoencoder.loss.disc_start), two optimizers, manual
optimisation. Uses data.*, model.autoencoder.*, train.{batch_size,max_steps,lr,checkpoint_every,
precision,devices,strategy}, run.* (the run directory is run.dir/run.name; pick a name other than the
diffusion run's, e.g. run.name=churches-ae). Writes model.autoencoder.checkpoint at the end.
Exit codes: 0 done, 2 config error, 143 stopped by SIGTERM (continue with --resume)."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train-autoencoder", help="train the KL autoencoder (first stage)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_steps=1000")
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint of the run")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import sys

    from sgdm.config.core import ConfigError, dump_yaml
    from sgdm.config.schema import load_experiment

    cfg = load_experiment(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(dump_yaml(cfg))
        return 0
    if cfg.model.autoencoder.checkpoint is None:
        raise ConfigError("model.autoencoder.checkpoint", "set the path the trained autoencoder is written to")
    from sgdm.training.autoencoder import train_autoencoder

    return train_autoencoder(cfg, resume=args.resume)
