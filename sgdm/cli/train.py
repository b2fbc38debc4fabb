"""``sgdm-ldm train CONFIG [key=value ...]``: train a self-guided latent diffusion model."""
from __future__ import annotations

import argparse

from sgdm.cli.arguments import add_config_arguments, add_resume_arguments, printed_config, wants_resume

DESCRIPTION = """Train a self-guided latent diffusion model (Hu et al., CVPR 2023) from a YAML config.

Overrides use dotted key paths, e.g. `model.unet.channels=128 train.max_steps=1000`.
The config is validated before any data or device is touched; an unknown key, a wrong
type or an inconsistent setting exits with code 2 and names the key path. The resolved
config is saved as RUN_DIR/config.yaml (RUN_DIR = run.dir/run.name). Exit codes: 0 done,
2 config error, 143 stopped by SIGTERM after writing a checkpoint (continue with --resume, or start
every run with --auto-resume)."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train a self-guided latent diffusion model from a YAML config",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, reads="all sections", example="train.lr=5e-5", print_config=True)
    add_resume_arguments(parser, resume_help="continue the run in RUN_DIR from its newest valid checkpoint (exactly: "
                                             "same weights, EMA, optimiser state and data order as an uninterrupted "
                                             "run)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from sgdm.config.schema import check_annotation_store, load_experiment

    cfg = load_experiment(args.config, args.overrides)
    if printed_config(cfg, args):
        return 0
    from sgdm.devices import check_accelerator

    check_accelerator(cfg.train.accelerator, cfg.train.devices, strategy=cfg.train.strategy,
                      precision=cfg.train.precision, num_nodes=cfg.train.num_nodes)
    check_annotation_store(cfg)
    from sgdm.training.run import check_resumable

    resume = wants_resume(args, cfg)
    check_resumable(cfg, resume)  # before prepare's minutes of work
    if not cfg.prepare.autoencoder:  # prepare will not make it: a missing file stops us before its work
        from sgdm.training.run import check_first_stage_file

        check_first_stage_file(cfg)
    if cfg.prepare.any():
        from sgdm.quickstart import prepare
        from sgdm.training.checkpoint import list_checkpoints

        prepare(cfg)
        # A self-preparing config (the quickstart) is one command to repeat: like its prepared
        # artefacts, its own run is reused, continued exactly from its last checkpoint.
        resume = resume or bool(list_checkpoints(cfg.run.path / "checkpoints"))
    from sgdm.training.run import train

    code = train(cfg, resume=resume)
    if code == 0 and cfg.prepare.report:
        from sgdm.quickstart import write_report

        write_report(cfg, cfg.run.path)
    return code
