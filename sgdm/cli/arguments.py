"""Arguments that several subcommands share: the experiment config and its overrides."""
from __future__ import annotations

import argparse
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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a usage error names the flag otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value
