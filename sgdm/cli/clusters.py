"""``sgdm-ldm clusters STORE --out gallery.html``: look at what each cluster captured."""
from __future__ import annotations

import argparse
import sys

from sgdm.cli.arguments import check_output
from sgdm.config.core import ConfigError

DESCRIPTION = """\
Write a static HTML page with a grid of images per cluster of an annotation
store (largest clusters first), boxes or masks drawn over them. The images
are read from the dataset recorded in the store's manifest, or from the
`data:` section of --config; data.* overrides apply on top of either
(e.g. data.root=/new/place for a dataset that has moved).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("clusters", help="write an HTML gallery of an annotation store's clusters",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="annotation store directory (annotation.store)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="data.* overrides of the dataset the images come from, e.g. data.root=/new/place")
    parser.add_argument("--out", default="gallery.html", help="HTML file to write (default: gallery.html)")
    parser.add_argument("--per-cluster", type=int, default=16, help="images shown per cluster (default 16)")
    parser.add_argument("--max-clusters", type=int, default=None,
                        help="show only the largest N clusters, N >= 1 (default: all clusters)")
    parser.add_argument("--thumb", type=int, default=96, help="thumbnail side in pixels (default 96)")
    parser.add_argument("--config", default=None, help="experiment YAML whose data: section holds the images")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from sgdm.annotation.gallery import missing_ids, write_gallery
    from sgdm.annotation.store import AnnotationStore
    from sgdm.data.decode import printable

    for flag, value in (("--per-cluster", args.per_cluster), ("--max-clusters", args.max_clusters),
                        ("--thumb", args.thumb)):
        if value is not None and value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}")
    check_output(args.out, "--out")
    try:
        store = AnnotationStore.open(args.store)
    except (FileNotFoundError, ValueError) as err:
        print(f"sgdm-ldm clusters: error: {err}", file=sys.stderr)
        return 1
    dataset = _dataset(store, args.config, args.overrides)
    missing = missing_ids(store, dataset)
    if missing:
        source = f"--config {args.config}" if args.config is not None else "the dataset its manifest records"
        print(f"sgdm-ldm clusters: error: {len(missing)} of the {len(store)} images of store {store.path} are not "
              f"in {source} (e.g. {printable(missing[0])!r}); give the config of the data the store was annotated "
              f"from, or data.* overrides that lead to it", file=sys.stderr)
        return 1
    out = write_gallery(store, dataset, args.out, args.per_cluster, args.thumb, args.max_clusters)
    print(f"wrote {out}")
    return 0


def _dataset(store, config: str | None, overrides: list[str]):
    """The images of ``store``: the ``data:`` section of ``config``, else the dataset its manifest
    records, with ``data.*`` ``overrides``. A bad setting that came from the manifest is named so."""
    from sgdm.config.core import apply_overrides, from_dict, load_yaml
    from sgdm.config.schema import ExperimentConfig
    from sgdm.data import build_dataset
    from sgdm.data.config import DataConfig

    given = {item.split("=", 1)[0].strip() for item in overrides}
    for key in sorted(given):
        if not key.startswith("data."):
            raise ConfigError(key, "clusters reads only the data: section; give data.* overrides (e.g. data.root=DIR)")
    if config is not None:
        raw = load_yaml(config)
    elif "config" in store.manifest.get("dataset", {}):
        raw = {"data": dict(store.manifest["dataset"]["config"])}
    else:
        raise ConfigError("--config", f"store {store.path} does not record its dataset; pass --config")
    apply_overrides(raw, overrides, ExperimentConfig)
    try:
        return build_dataset(from_dict(DataConfig, raw.get("data"), "data"), train=False)
    except ConfigError as err:
        if config is not None or err.key in given:
            raise
        manifest = store.path / "manifest.json"
        raise ConfigError("", f"{err.key} as recorded in the store's manifest {manifest}: {err.message}; read the "
                              f"images from where they are now with an override, e.g. sgdm-ldm clusters "
                              f"{store.path} {err.key}=DIR, or pass --config") from None
