"""Arguments that several subcommands share: the experiment config and its overrides."""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys


def add_config_arguments(parser: argparse.ArgumentParser, *, reads: str, example: str,
                         print_config: bool = False) -> None:
    """``CONFIG [KEY=VALUE ...]``, and ``--print-config`` for commands that load the whole experiment.

    ``reads`` says which sections the command uses; ``example`` is one override for the help text.
    """
    parser.add_argument("config", help=f"experiment YAML (uses {reads}; see configs/)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"dotted overrides applied on top of the YAML, e.g. {example}")
    if print_config:
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved, validated config as YAML and exit")


def printed_config(cfg, args: argparse.Namespace) -> bool:
    """Write ``cfg`` as YAML to stdout when ``--print-config`` was given; True when it was. The form is
    the one a run's ``config.yaml`` records, so the output loads back as a config."""
    if not args.print_config:
        return False
    from sgdm.config.core import dump_yaml
    from sgdm.config.schema import recorded_config

    sys.stdout.write(dump_yaml(recorded_config(cfg)))
    return True


def add_resume_arguments(parser: argparse.ArgumentParser, *, resume_help: str) -> None:
    """``--resume`` and ``--auto-resume`` (one of them) of a training command; :func:`wants_resume` reads them."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help=resume_help)
    group.add_argument("--auto-resume", action="store_true",
                       help="continue the run when it has a checkpoint, else start it: one command for a job that a "
                            "scheduler may stop (SIGTERM: a checkpoint, exit 143) and start again")


def wants_resume(args: argparse.Namespace, cfg) -> bool:
    """Whether the run ``cfg`` continues: ``--resume``, or ``--auto-resume`` and the run has a checkpoint."""
    if args.resume or not args.auto_resume:
        return bool(args.resume)
    from sgdm.training.checkpoint import list_checkpoints

    return bool(list_checkpoints(cfg.run.path / "checkpoints"))


def take_negative_numbers(parser: argparse.ArgumentParser) -> None:
    """Words that start like a negative number (``-1,0,1``, ``-0.5,0,1,1``, ``-1e-3``) are values of ``parser``'s
    options, not unknown options: argparse's own pattern takes only ``-1`` and ``-1.5``, so
    ``--sweep-scale -1,0,1`` failed with "expected one argument". ``parser`` has no option spelt like a number."""
    parser._negative_number_matcher = re.compile(r"^-\.?[0-9]")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a usage error names the flag otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def check_output(path: pathlib.Path, flag: str, *, folder: bool = False) -> None:
    """Before any work: ``path`` can be written, as a file (``folder``: as a folder of files): it is not an
    existing folder (``folder``: file) and the nearest of its parents that exists is a writable folder.
    A ConfigError names ``flag`` otherwise (instead of a traceback once the work is done)."""
    from sgdm.config.core import ConfigError

    path = pathlib.Path(path)
    if path.exists() and path.is_dir() != folder:
        kind = "file" if folder else "folder"
        raise ConfigError(flag, f"{path} is an existing {kind}; name a {'folder' if folder else 'file'} to write")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(flag, f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(flag, f"cannot write {path}: folder {parent} is not writable")
