"""``sgdm-ldm`` entry point: dispatches to one module per subcommand.

Each subcommand module ``sgdm.cli.<name>`` defines ``add_parser(subparsers)``
(which registers its arguments and sets ``func``) and is imported only when
needed, so ``sgdm-ldm --help`` stays fast.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sgdm.cli.train", "train a self-guided latent diffusion model from a YAML config"),
    "train-autoencoder": ("sgdm.cli.train_autoencoder", "train the KL autoencoder (first stage)"),
    "sample": ("sgdm.cli.sample", "sample images from a trained run or .safetensors file"),
    "annotate": ("sgdm.cli.annotate", "self-annotate a dataset: clusters, boxes or masks"),
    "clusters": ("sgdm.cli.clusters", "write an HTML gallery of an annotation store's clusters"),
    "validate-data": ("sgdm.cli.validate_data", "list the files of a dataset that cannot be read"),
    "eval": ("sgdm.cli.evaluate", "FID / IS / KID and layout adherence of a trained run"),
    "pretrain-features": ("sgdm.cli.pretrain_features", "DINO-style self-supervised feature pretraining"),
    "info": ("sgdm.cli.info", "this installation: versions, kernels, GPUs; --check runs the ops"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgdm-ldm",
        description="Self-guided latent diffusion: train, annotate, sample and evaluate.",
    )
    from sgdm import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parser.subcommand_parsers = sub.choices  # name -> its parser, for main()'s intermixed parsing
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            sub.add_parser(name, help=f"{help_text} (not available in this build)")
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    if command in SUBCOMMANDS and argv[0] == command:
        # Options and KEY=VALUE overrides in any order (`train CONFIG --resume train.lr=5e-5`): the
        # subcommand's parser reads its arguments intermixed, which the top-level parser cannot do.
        args = parser.subcommand_parsers[command].parse_intermixed_args(argv[1:])
        args.command = command
    else:
        args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.error(f"subcommand {args.command!r} is not available in this build")
    from sgdm.config import ConfigError

    try:
        return int(func(args) or 0)
    except Exception as err:
        if isinstance(err, ConfigError):
            where = f" ({err.where})" if err.where else ""  # the file and line, or the override
            print(f"sgdm-ldm {args.command}: config error: {err}{where}", file=sys.stderr)
            return 2
        message = _complete_message(err)
        if message is None:
            raise
        print(f"sgdm-ldm {args.command}: error: {message}", file=sys.stderr)
        return 1


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _complete_message(err: Exception) -> str | None:
    """The one-line message of an error that says all a user needs (what does not fit and what to
    do), from any subcommand (exit 1), or None for the others, which keep their traceback. Imported
    only when an error is raised."""
    from sgdm.annotation.features import BackboneError
    from sgdm.annotation.store import StoreMismatchError
    from sgdm.data.decode import bad_image_message

    if isinstance(err, (StoreMismatchError, BackboneError)):
        return str(err)
    if isinstance(err, OSError) and (err.errno in _DISK_FULL or err.errno in _NOT_WRITABLE and err.filename):
        return str(err)  # a full disk or a file that may not be written: the fix is outside the program
    bad = bad_image_message(err)  # data.on_bad_image: raise, in this process or a DataLoader worker
    if bad is not None:
        return (f"{bad} (data.on_bad_image is 'raise'; `sgdm-ldm validate-data` lists every unreadable file, "
                "data.on_bad_image=skip leaves them out)")
    return None


if __name__ == "__main__":
    sys.exit(main())
