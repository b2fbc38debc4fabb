"""``sgdm-ldm train-autoencoder CONFIG [key=value ...]``: train the KL autoencoder (first stage)."""
from __future__ import annotations

import argparse

from sgdm.cli.arguments import add_config_arguments, add_resume_arguments, printed_config, wants_resume

DESCRIPTION = """Train the KL autoencoder (LDM's first stage) of an experiment config with LDM's losses
(L1 + LPIPS + KL, hinge PatchGAN from model.autoencoder.loss.disc_start), two optimizers, manual
optimisation (Adam, betas 0.5 and 0.9 as LDM). Uses data.*, model.autoencoder.*, train.{batch_size,
accumulate,max_steps,lr,checkpoint_every,keep_checkpoints,log_every,logger,progress_bar,precision,
accelerator,devices,num_nodes,strategy}, run.* (the run directory is run.dir/run.name; pick a name
other than the diffusion run's, e.g. run.name=churches-ae). train.batch_size is the global batch of one
optimiser step; train.accumulate splits it into that many micro-batches per device (less memory; the
discriminator's BatchNorm then normalises over micro-batches). Writes model.autoencoder.checkpoint at the end.
Exit codes: 0 done, 1 an error said in one line (an unreadable image under data.on_bad_image=raise,
...), 2 config error, 130 stopped by Ctrl+C, 143 by SIGTERM (continue with --resume)."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train-autoencoder", help="train the KL autoencoder (first stage)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, reads="all sections", example="train.max_steps=1000", print_config=True)
    add_resume_arguments(parser, resume_help="continue from the newest valid checkpoint of the run")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from sgdm.config.core import ConfigError
    from sgdm.config.schema import load_experiment

    cfg = load_experiment(args.config, args.overrides)
    if printed_config(cfg, args):
        return 0
    if cfg.model.autoencoder.checkpoint is None:
        raise ConfigError("model.autoencoder.checkpoint", "set the path the trained autoencoder is written to")
    from sgdm.devices import check_accelerator

    check_accelerator(cfg.train.accelerator, cfg.train.devices, strategy=cfg.train.strategy,
                      precision=cfg.train.precision, num_nodes=cfg.train.num_nodes)
    from sgdm.training.autoencoder import train_autoencoder
    from sgdm.training.run import check_resumable

    resume = wants_resume(args, cfg)
    check_resumable(cfg, resume)
    return train_autoencoder(cfg, resume=resume)
