"""Before sampling: evaluation measures the run against the annotations and the f it was made with.

Sampling is the expensive part of an evaluation, so whatever would make its numbers measure something
other than the run, its annotation store and the store's self-annotation f stops it first, as a
ConfigError naming the key and both values (:func:`check_store`):

* the store agrees with the run's guidance (kind, source, K, dataset:
  :func:`~sgdm.config.schema.check_annotation_store`, training's own check), and holds what the run was
  trained on: its content digest against the run's ``annotation_store.json``, which training writes at
  every start (a store annotated again since holds guidance the model never saw);
* adherence's extractor (:func:`~sgdm.evaluation.feature_distance.annotation_space`) is the one the
  store's features came from: the manifest's ``extractor`` (backbone, kwargs, weights content, input size);
* the settings of f that adherence reads are the store's (manifest ``params``, compared by
  :meth:`~sgdm.annotation.store.AnnotationStore.settings_differ`): LOST's for boxes; for masks, K and
  the class maps' grid and CRF (those of the store's own f, which scores the samples), and every
  ``stego`` / ``kmeans`` setting where f is fitted on the samples (a store that did not keep its f);
* the k-means centroids of a label or box store (f of its cluster ids,
  :class:`~sgdm.annotation.centroids.ClusterF`) can be read, are the file the manifest records, hold the
  store's K (:func:`check_store`) and take features of the extractor's width (:func:`check_feature_dim`).
  A label or box store without them (an older sgdm's, or ground truth) cannot score cluster adherence:
  :func:`missing_cluster_f` says why and how to get it.

Ground-truth stores have no f (only the first check applies); stores written before a record existed
are not compared on it.
"""
from __future__ import annotations

import json
import pathlib
from typing import Optional, Sequence

from sgdm.config.core import ConfigError, to_dict

__all__ = ["check_store", "check_store_extractor", "check_store_record", "check_input_size", "check_adherence_settings",
           "check_feature_dim", "missing_cluster_f", "scored_by_stored_f"]


def scored_by_stored_f(kind: str, store) -> bool:
    """Whether adherence of ``kind`` guidance reads the self-annotation f of ``store`` (and so its extractor
    and settings): box and mask runs always (LOST, or a segmenter), label runs where the store kept its
    k-means centroids."""
    if store.source != "self":
        return False
    return kind in ("box", "mask") or (kind == "label" and store.manifest.get("centroids") is not None)


def missing_cluster_f(cfg) -> Optional[str]:
    """Why cluster adherence (of a label or box run) cannot be measured, in one line saying how to get it,
    or None where it can (or the run has no cluster guidance)."""
    from sgdm.annotation.store import AnnotationStore

    if cfg.model.guidance.kind not in ("label", "box"):
        return None
    store = AnnotationStore.open(cfg.annotation.store)
    if store.source == "gt":
        return (f"the annotation store {store.path} holds ground-truth classes, and no f assigns samples to them, "
                f"so cluster adherence is not measured")
    if store.manifest.get("centroids") is None:
        return (f"the annotation store {store.path} was made by an older sgdm, which did not keep its k-means "
                f"centroids (f), so cluster adherence is not measured: run `sgdm-ldm annotate` on the run's config "
                f"again to keep them (it reuses the cached features in {store.path / 'work'} when they are there; "
                f"with the same settings it writes the same clusters, which evaluation accepts)")
    return None


def check_store(cfg, metrics: Sequence[str], run_dir: pathlib.Path) -> None:
    """Every check of the module docstring that applies to run ``cfg`` (its resolved config) evaluated
    with ``metrics``, but the extractor's input size: :func:`check_input_size`, once it is built."""
    from sgdm.annotation.store import AnnotationStore
    from sgdm.config.schema import check_annotation_store

    kind = cfg.model.guidance.kind
    if kind == "none":
        return
    check_annotation_store(cfg)
    store = AnnotationStore.open(cfg.annotation.store)
    check_store_record(store, run_dir)
    if "adherence" not in metrics or not scored_by_stored_f(kind, store):
        return
    if kind in ("label", "box"):
        from sgdm.annotation.centroids import ClusterF

        ClusterF.of_store(store)  # a missing, replaced or unreadable file, or one of another K, stops us now
    check_store_extractor(cfg, metrics, run_dir)
    check_adherence_settings(cfg, store, run_dir)


def check_store_record(store, run_dir: pathlib.Path) -> None:
    """The store ``store`` holds what run ``run_dir`` was trained on: its content digest equals the one
    the run recorded (``annotation_store.json``); a run without the record is not compared."""
    from sgdm.training.resume import STORE

    record = pathlib.Path(run_dir) / STORE.record
    if not record.is_file():
        return
    try:
        saved = json.loads(record.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{record}: cannot read the run's record of its annotation store: {err}") from None
    if not saved:
        return
    if not store.matches_digest(saved):
        now = store.content_digest()
        raise ConfigError("annotation.store", f"{store.path} holds other annotations than run {run_dir} was trained "
                                              f"on: its content digest is {now[:16]}..., the run recorded "
                                              f"{saved[:16]}... ({record}, written when training started), so the "
                                              f"evaluation would draw guidance the model never saw. Point "
                                              f"annotation.store in {pathlib.Path(run_dir) / 'config.yaml'} at the "
                                              f"store the run was trained on, or restore it")


def check_store_extractor(cfg, metrics: Sequence[str], run_dir: pathlib.Path) -> None:
    """Adherence scores the samples with the run's ``annotation.backbone``, ``backbone_kwargs``, ``weights``
    and ``image_size`` (:func:`~sgdm.evaluation.feature_distance.annotation_space`), whose features the
    store's clusters and segmenter f were fitted on; a store made with another extractor (its manifest's
    ``extractor``, written by ``sgdm-ldm annotate``) would fail to load only after sampling, or score with
    the wrong network. ConfigError naming each key that differs and both values. Ground-truth stores and
    stores that record no extractor are not compared. The input size is compared by :func:`check_input_size`
    once the extractor is built."""
    from sgdm.annotation.features import file_sha256
    from sgdm.annotation.store import AnnotationStore

    a = cfg.annotation
    if "adherence" not in metrics or cfg.model.guidance.kind not in ("label", "box", "mask") or a.store is None:
        return
    store = AnnotationStore.open(a.store)
    made = store.manifest.get("extractor")
    if store.source != "self" or not made:
        return
    if a.weights is not None and not a.weights.is_file():
        raise ConfigError("annotation.weights", f"file {a.weights} does not exist; adherence scores the samples "
                                                f"with the encoder the annotation store {a.store} was made with "
                                                f"({made.get('weights')})")
    run = {"annotation.backbone": a.backbone, "annotation.backbone_kwargs": json.loads(json.dumps(a.backbone_kwargs))}
    recorded = {"annotation.backbone": made.get("backbone"), "annotation.backbone_kwargs": made.get("backbone_kwargs") or {}}
    sha = made.get("weights_sha256")
    if sha and sha != "random":  # "random": a test store's untrained encoder, no file to compare
        ours = f"hub:{a.backbone}" if a.weights is None else file_sha256(a.weights)
        if ours != sha:
            def named(path, digest):
                return digest if digest.startswith("hub:") else f"{path} (sha256 {digest[:12]}...)"

            run["annotation.weights"] = named(a.weights, ours)
            recorded["annotation.weights"] = named(made.get("weights"), sha)
    differ = [k for k in run if run[k] != recorded.get(k)]
    if differ:
        values = "; ".join(f"{k}: the run has {run[k]!r}, the store {recorded[k]!r}" for k in differ)
        raise ConfigError("annotation", f"adherence would score the samples with another feature extractor than the "
                                     f"one the annotation store {a.store} was made with ({a.store / 'manifest.json'}, "
                                     f"'extractor'): {values}. Set these keys in {run_dir / 'config.yaml'} to the "
                                     f"store's values, or leave adherence out of --metrics (eval.metrics)")


def check_input_size(cfg, input_size: Sequence[int], run_dir: pathlib.Path) -> None:
    """The extractor adherence built takes images at the (H, W) ``input_size`` the store's extractor took them
    (its manifest's ``extractor.input_size``): the input the images are resized to before the backbone
    (``annotation.image_size``, or the backbone's own); another one gives other features, another patch
    grid, other boxes and masks. ConfigError naming ``annotation.image_size`` and both sizes."""
    from sgdm.annotation.store import AnnotationStore

    store = AnnotationStore.open(cfg.annotation.store)
    made = (store.manifest.get("extractor") or {}).get("input_size") if store.source == "self" else None
    if not made or [int(s) for s in made] == [int(s) for s in input_size]:
        return
    size = lambda hw: "x".join(str(int(s)) for s in hw)  # noqa: E731
    raise ConfigError("annotation.image_size", f"adherence's extractor takes {size(input_size)} px inputs "
                                               f"(annotation.image_size {cfg.annotation.image_size}, 0: the "
                                               f"backbone's own), the annotation store {store.path} was made at "
                                               f"{size(made)} px ({store.path / 'manifest.json'}, 'extractor'); "
                                               f"set annotation.image_size in {pathlib.Path(run_dir) / 'config.yaml'} "
                                               f"to the store's value, or leave adherence out of --metrics (eval.metrics)")


def check_feature_dim(cfg, backbone, run_dir: pathlib.Path) -> None:
    """The store's k-means centroids (label, box) take CLS features as wide as those of ``backbone``, the
    extractor adherence built (:func:`~sgdm.evaluation.feature_distance.annotation_space`); measured on one
    blank image, so that a mismatch stops the evaluation before sampling, not after it. ConfigError naming
    ``annotation.backbone_kwargs`` and both widths. Stores without centroids are not compared."""
    import torch

    from sgdm.annotation.centroids import ClusterF
    from sgdm.annotation.features import extract
    from sgdm.annotation.store import AnnotationStore

    f = ClusterF.of_store(AnnotationStore.open(cfg.annotation.store))
    if f is None:
        return
    device = next(backbone.model.parameters()).device
    dim = extract(backbone, torch.zeros(1, 3, *backbone.input_size, device=device), patches=False).cls.shape[1]
    if dim != f.dim:
        raise ConfigError("annotation.backbone_kwargs", f"adherence's extractor ({backbone.name}) gives {dim}-wide CLS "
                                                        f"features, the k-means centroids of the annotation store "
                                                        f"{cfg.annotation.store} take {f.dim}-wide ones: set "
                                                        f"annotation.backbone, backbone_kwargs and weights in "
                                                        f"{pathlib.Path(run_dir) / 'config.yaml'} to the store's, or "
                                                        f"leave adherence out of --metrics (eval.metrics)")


def _adherence_keys(granularity: str, fitted_on_samples: bool) -> tuple[str, ...]:
    """Prefixes of the ``annotation.*`` settings (as :meth:`settings_differ` names them) that the
    adherence of ``granularity`` reads. Batch sizes, devices and chunk sizes change no score."""
    extractor = ("backbone", "backbone_kwargs", "image_size")
    if granularity == "label":
        return extractor  # the store's centroids assign the samples; K is compared with the run's guidance
    if granularity == "box":
        return (*extractor, "lost.")  # LOST itself; num_clusters is the store's K
    if fitted_on_samples:  # f is fitted again, on the samples: every setting of the fit
        return (*extractor, "num_classes", "stego.", "kmeans.")
    return (*extractor, "num_classes", "stego.mask_size", "stego.crf.")  # the store's own f draws the maps


def _leaf(params: dict, key: str):
    value = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return "(not recorded)"
        value = value[part]
    return value


def check_adherence_settings(cfg, store, run_dir: pathlib.Path) -> None:
    """The settings of f that box or mask adherence reads (:func:`_adherence_keys`) are those the
    self-annotated store ``store`` was made with (its manifest's ``params``); ConfigError naming every
    ``annotation.*`` key that differs and both values. A store that records no params is not compared."""
    import dataclasses

    if store.source != "self":
        return
    if store.granularity == "mask" and store.manifest.get("segmenter") is not None:
        segmenter = store.segmenter()  # a missing or unreadable file stops the evaluation now, not after sampling
        if segmenter.num_classes != store.num_classes:
            raise ValueError(f"annotation store {store.path}: its segmenter {store.manifest['segmenter']} has "
                             f"{segmenter.num_classes} classes, its manifest K={store.num_classes}; the store "
                             f"is inconsistent: annotate it again")
    if store.manifest.get("params") is None:
        return
    a = dataclasses.replace(cfg.annotation, granularity=store.granularity)
    fitted = store.granularity == "mask" and store.manifest.get("segmenter") is None
    prefixes = _adherence_keys(store.granularity, fitted)
    # the weights' content is check_store_extractor's: it names both files
    differ = [k for k in store.settings_differ(a) if any(k == p or (p.endswith(".") and k.startswith(p)) for p in prefixes)]
    if not differ:
        return
    ours, theirs = to_dict(a), store.manifest["params"]
    values = "; ".join(f"annotation.{k}: the run has {_leaf(ours, k)!r}, the store {_leaf(theirs, k)!r}"
                       for k in differ)
    made = f"the annotation store {store.path} was made with ({store.path / 'manifest.json'}, 'params')"
    what = (f"mask adherence fits f on the samples with the run's settings (the store kept no segmenter), which "
            f"differ from those {made}" if fitted else
            f"mask adherence scores the samples with the store's own f (its segmenter), and the run's settings "
            f"describe another f than the one {made}" if store.granularity == "mask" else
            f"cluster adherence assigns the samples with the store's centroids on the run's extractor, which "
            f"differs from the one {made}" if store.granularity == "label" else
            f"box adherence re-annotates the samples with the run's settings, which differ from those {made}")
    raise ConfigError("annotation", f"{what}: {values}. Set these keys in {pathlib.Path(run_dir) / 'config.yaml'} "
                                    f"to the store's values, or leave adherence out of --metrics (eval.metrics)")
