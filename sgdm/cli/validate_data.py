"""``sgdm-ldm validate-data CONFIG``: list exactly the files of a dataset that cannot be read."""
from __future__ import annotations

import argparse
import os
import sys

from sgdm.cli.arguments import add_config_arguments

DESCRIPTION = """\
Read every item of the dataset in the config's `data:` section (images and,
where the dataset has them, annotation files), print one line per file that
cannot be read (path and reason), then how many are fine. Under
data.exif_orientation=ignore (the default), a note says how many readable images
carry an EXIF rotation or mirroring that is not applied (phone photos).

Exit status: 0 when every file is readable, 1 when at least one is bad,
2 on a config error (bad key, missing root or list file).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("validate-data", help="list the files of a dataset that cannot be read",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, reads="its data: section", example="data.split=val")
    parser.add_argument("--split", help="split to check instead of data.split")
    parser.add_argument("--workers", type=int, default=None,
                        help="reader processes, 0: in this process (default: data.num_workers, at most the CPUs "
                             "this process may use)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from sgdm.config import ConfigError, apply_overrides, from_dict, load_yaml
    from sgdm.config.core import check_known_keys
    from sgdm.data.build import build_dataset
    from sgdm.data.config import EXIF_KINDS, DataConfig
    from sgdm.data.decode import printable
    from sgdm.data.scan import scan_dataset

    from sgdm.config.schema import ExperimentConfig

    # typed by the experiment schema (text and path keys take the override text as written)
    raw = apply_overrides(load_yaml(args.config), args.overrides, ExperimentConfig)
    check_known_keys(ExperimentConfig, raw)  # a misspelt key (dta.root=...) must not check another dataset
    cfg = from_dict(DataConfig, raw.get("data"), "data")
    dataset = build_dataset(cfg, train=False, split=args.split)
    if args.workers is not None and args.workers < 0:
        raise ConfigError("--workers", f"must be >= 0, got {args.workers}")
    # reading is I/O and decoding: more processes than CPUs only add start-up time (and torch's warning)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # Linux / other
    workers = min(cfg.num_workers, cpus) if args.workers is None else args.workers
    found = scan_dataset(dataset, num_workers=workers, progress=sys.stderr.isatty(),
                         report=lambda item: print(f"BAD {printable(item.source)}: {item.reason}", flush=True))
    bad = found.bad
    fine = len(dataset) - len(bad)
    print(f"{dataset.name} ({cfg.split if args.split is None else args.split}): {fine} of {len(dataset)} "
          f"items are fine, {len(bad)} cannot be read")
    if found.oriented and cfg.exif_orientation == "ignore":  # a note only: the files are readable
        fix = ("data.exif_orientation=apply reads them upright" if cfg.dataset in EXIF_KINDS
               else f"{cfg.dataset} reads the stored pixels, which its annotations refer to")
        print(f"note: {len(found.oriented)} images carry an EXIF rotation or mirroring that "
              f"data.exif_orientation=ignore does not apply; {fix} "
              f"(first: {printable(dataset.source(found.oriented[0]))})")
    return 1 if bad else 0
