"""``sgdm-ldm train CONFIG [key=value ...]``: train a self-guided latent diffusion model."""
from __future__ import annotations

import argparse
import contextlib

from sgdm.cli.arguments import add_config_arguments, add_resume_arguments, printed_config, wants_resume

DESCRIPTION = """Train a self-guided latent diffusion model (Hu et al., CVPR 2023) from a YAML config.

Overrides use dotted key paths, e.g. `model.unet.channels=128 train.max_steps=1000`.
The config is validated before any data or device is touched; an unknown key, a wrong
type or an inconsistent setting exits with code 2 and names the key path. The resolved
config is saved as RUN_DIR/config.yaml (RUN_DIR = run.dir/run.name). Exit codes: 0 done,
1 an error said in one line (an unreadable image under data.on_bad_image=raise, ...), 2 config
error, 130 stopped by Ctrl+C and 143 by SIGTERM, after writing a checkpoint (continue with --resume, or
start every run with --auto-resume; a second Ctrl+C stops at once, without one).

A config with a `prepare:` section (the quickstart) makes its assets first, in one process, then
trains. Under torchrun or srun the processes only reuse them: make them once with
`sgdm-ldm train CONFIG --prepare-only` (one process, same config and overrides), then launch. A run of
several processes leaves `prepare.report` to the same command in one process (`train.devices=1`),
which trains nothing more and writes the report."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train a self-guided latent diffusion model from a YAML config",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, reads="all sections", example="train.lr=5e-5", print_config=True)
    add_resume_arguments(parser, resume_help="continue the run in RUN_DIR from its newest valid checkpoint (exactly: "
                                             "same weights, EMA, optimiser state and data order as an uninterrupted "
                                             "run)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="run the config's prepare: stages (dataset, autoencoder, features, annotations) in this "
                             "one process, then stop: what a torchrun or srun launch of the config reuses")
    parser.set_defaults(func=run)
    return parser


def _several_processes(cfg) -> int:
    """How many processes trained (or train) this run: the launcher's, the config's, or the process group's."""
    import torch.distributed as dist

    from sgdm.launch import current

    group = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return max(current().world_size, cfg.train.world_size() or 1, group)


def run(args: argparse.Namespace) -> int:
    from sgdm.config.schema import load_experiment

    cfg = load_experiment(args.config, args.overrides)
    if printed_config(cfg, args):
        return 0
    from sgdm.devices import check_accelerator

    check_accelerator(cfg.train.accelerator, cfg.train.devices, strategy=cfg.train.strategy,
                      precision=cfg.train.precision, num_nodes=cfg.train.num_nodes)
    from sgdm.launch import current

    launch = current()
    launched = launch.launcher in ("torchrun", "srun") and launch.world_size > 1  # every process runs this now
    with contextlib.ExitStack() as group:  # the process group of such a launch, once joined (_same_images)
        return _train(args, cfg, launched, group)


def _same_images(cfg, images, group: contextlib.ExitStack):
    """The training images (built unless ``images`` are), once every process of a torchrun or srun launch
    found them the same as rank 0 does (:func:`~sgdm.training.dataset_record.agree_across_ranks`): before
    the annotation store's check, the resume's and the latent cache's read their files, which one rank alone
    could refuse. Joins their process group for it, kept in ``group`` (Lightning's DDP takes it over, and so
    no longer says that its processes registered: the first one says it here)."""
    import sys

    import torch.distributed as dist

    from sgdm.launch import current, process_group
    from sgdm.training.data import build_image_dataset
    from sgdm.training.dataset_record import agree_across_ranks

    images = build_image_dataset(cfg.data, cfg.run.seed) if images is None else images
    group.enter_context(process_group("cpu" if cfg.train.accelerator == "cpu" else "auto"))
    launch = current()
    if launch.is_first:
        print(f"sgdm: the {dist.get_world_size()} processes {launch.launcher} started joined their process group "
              f"({dist.get_backend()})", file=sys.stderr, flush=True)
    agree_across_ranks(images, cfg.data.root)
    return images


def _train(args: argparse.Namespace, cfg, launched: bool, group: contextlib.ExitStack) -> int:
    from sgdm.config.schema import check_annotation_store

    images = None
    if cfg.model.guidance.kind != "none" and not cfg.prepare.any():  # prepare may make the images or the store
        from sgdm.training.data import build_image_dataset

        images = build_image_dataset(cfg.data, cfg.run.seed)  # the store's check and training stat their files once
    if launched and not cfg.prepare.any():
        images = _same_images(cfg, images, group)
    check_annotation_store(cfg, images)
    from sgdm.training.run import check_resumable

    resume = wants_resume(args, cfg)
    check_resumable(cfg, resume)  # before prepare's minutes of work
    if not cfg.prepare.autoencoder:  # prepare will not make it: a missing file stops us before its work
        from sgdm.training.run import check_first_stage_file

        check_first_stage_file(cfg)
    from sgdm.config.core import ConfigError
    from sgdm.launch import current

    launch = current()
    if args.prepare_only and not cfg.prepare.makes_assets():
        raise ConfigError("--prepare-only", "the config has no prepare: stage to run (prepare.dataset, autoencoder, "
                                            "features, annotations are all false)")
    if args.prepare_only and launched:
        raise ConfigError("--prepare-only", f"runs in one process, but {launch.launcher} started {launch.world_size}; "
                                            "run it without the launcher")
    if cfg.prepare.any():
        from sgdm.quickstart import prepare
        from sgdm.training.checkpoint import list_checkpoints

        from sgdm.quickstart.stages import Stopped

        try:
            prepare(cfg, build=not launched)
        except Stopped as err:  # SIGTERM in the autoencoder's training: its checkpoint is written
            return err.code
        if args.prepare_only:
            return 0
        # A self-preparing config (the quickstart) is one command to repeat: like its prepared
        # artefacts, its own run is reused, continued exactly from its last checkpoint.
        resume = resume or bool(list_checkpoints(cfg.run.path / "checkpoints"))
    from sgdm.training.dataset_record import same_images_callback
    from sgdm.training.run import train

    if launched:
        images = _same_images(cfg, images, group) if cfg.prepare.any() else images  # prepare checked, made nothing
        callbacks = ()
    else:  # Lightning's launcher starts the other processes in Trainer.fit: they compare their images there
        from sgdm.training.data import build_image_dataset

        images = build_image_dataset(cfg.data, cfg.run.seed) if images is None else images
        callbacks = (same_images_callback(images, cfg.data.root),)
    code = train(cfg, resume=resume, callbacks=callbacks, dataset=images)
    if code == 0 and cfg.prepare.report:
        processes = _several_processes(cfg)
        if processes > 1:  # its evaluations and companion runs are one process's work
            if launch.is_first:
                import sys

                print(f"sgdm: prepare.report is not written by a run of {processes} processes; write it with the same "
                      "command in one process (train.devices=1, without a launcher): the run is complete, so it "
                      "trains nothing more", file=sys.stderr)
            return code
        from sgdm.quickstart import write_report
        from sgdm.quickstart.stages import Stopped

        try:
            write_report(cfg, cfg.run.path)
        except Stopped as err:  # SIGTERM in a companion run's training
            return err.code
    return code
