"""``sgdm-ldm annotate CONFIG``: self-annotate a dataset into an annotation store."""
from __future__ import annotations

import argparse
import json
import sys

from sgdm.cli.arguments import add_config_arguments

DESCRIPTION = """\
Extract features of the dataset in the config's `data:` section with the
`annotation.backbone`, run the self-annotation function for the granularity
(label: k-means clusters; box: LOST boxes + clusters; mask: STEGO class maps)
and write the store at `annotation.store`. An interrupted run resumes without
redoing finished shards. With torchrun, ranks share the work.
`annotation.source: gt` fills the store from ground truth instead.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("annotate", help="self-annotate a dataset: clusters, boxes or masks",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the whole config is validated, so a K of its own needs the guidance's K too
    add_config_arguments(parser, reads="its data: and annotation: sections",
                         example="annotation.num_classes=50 model.guidance.num_classes=50")
    parser.add_argument("--granularity", choices=("label", "box", "mask"), help="instead of annotation.granularity")
    parser.add_argument("--evaluate", action="store_true",
                        help="score against the dataset's ground truth (NMI/ARI/purity, CorLoc, mIoU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from sgdm.annotation.annotate import RankFailed, annotate
    from sgdm.config.core import ConfigError
    from sgdm.config.schema import load_experiment
    from sgdm.launch import process_group

    cfg = load_experiment(args.config, args.overrides)  # annotate reads its data and annotation sections
    _warn_granularity(args, cfg.annotation)
    try:
        with process_group(cfg.annotation.device):  # one process unless torchrun or srun started several
            result = annotate(cfg, args.granularity, args.evaluate, progress=not args.no_progress)
    except ConfigError:
        raise  # main() reports it (exit 2)
    except (FileNotFoundError, ValueError, RankFailed) as err:
        return _error(str(err))
    if result.metrics:
        print(json.dumps(result.metrics, indent=1))
    return 0


def _warn_granularity(args: argparse.Namespace, a) -> None:
    """--granularity other than the config's: the store it writes is one that training with this config
    refuses (annotate itself refuses to replace a store of another granularity)."""
    from sgdm.launch import current

    g = args.granularity
    if g is None or g == a.granularity or (current().rank or 0) != 0:
        return
    print(f"sgdm-ldm annotate: warning: --granularity {g} differs from annotation.granularity {a.granularity} of "
          f"{args.config}: training reads the {g} store it writes at {a.store} only with annotation.granularity={g} "
          f"model.guidance.kind={g} annotation.store={a.store}", file=sys.stderr)


def _error(message: str) -> int:
    print(f"sgdm-ldm annotate: error: {message}", file=sys.stderr)
    return 1
