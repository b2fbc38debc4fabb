"""``sgdm-ldm clusters STORE --out gallery.html``: look at what each cluster captured."""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Write a static HTML page with a grid of images per cluster of an annotation
store (largest clusters first), boxes or masks drawn over them. The images
are read from the dataset recorded in the store's manifest, or from the
`data:` section of --config.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("clusters", help="write an HTML gallery of an annotation store's clusters",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="annotation store directory (annotation.store)")
    parser.add_argument("--out", default="gallery.html", help="HTML file to write (default: gallery.html)")
    parser.add_argument("--per-cluster", type=int, default=16, help="images shown per cluster (default 16)")
    parser.add_argument("--max-clusters", type=int, default=None,
                        help="show only the largest N clusters, N >= 1 (default: all clusters)")
    parser.add_argument("--thumb", type=int, default=96, help="thumbnail side in pixels (default 96)")
    parser.add_argument("--config", default=None, help="experiment YAML whose data: section holds the images")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from sgdm.annotation.gallery import write_gallery
    from sgdm.annotation.store import AnnotationStore
    from sgdm.config.core import ConfigError, from_dict, load_yaml
    from sgdm.data import build_dataset
    from sgdm.data.config import DataConfig

    for flag, value in (("--per-cluster", args.per_cluster), ("--max-clusters", args.max_clusters),
                        ("--thumb", args.thumb)):
        if value is not None and value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}")
    try:
        store = AnnotationStore.open(args.store)
    except (FileNotFoundError, ValueError) as err:
        print(f"sgdm-ldm clusters: error: {err}", file=sys.stderr)
        return 1
    if args.config is not None:
        data = from_dict(DataConfig, load_yaml(args.config).get("data"), "data")
    elif "config" in store.manifest.get("dataset", {}):
        data = from_dict(DataConfig, store.manifest["dataset"]["config"], "manifest.dataset.config")
    else:
        raise ConfigError("--config", f"store {store.path} does not record its dataset; pass --config")
    out = write_gallery(store, build_dataset(data, train=False), args.out, args.per_cluster, args.thumb, args.max_clusters)
    print(f"wrote {out}")
    return 0
