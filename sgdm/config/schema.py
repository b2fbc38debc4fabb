"""The whole experiment: every config section composed, and the checks across sections.

``load_experiment(path, overrides)`` is what entry points call: YAML, dotted
overrides, per-section validation (each dataclass's ``validate``), then the
cross-section checks below, all before any data or device is touched. Every
error is a :class:`~sgdm.config.core.ConfigError` naming the dotted key path.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

from sgdm.annotation.config import AnnotationConfig
from sgdm.config.core import ConfigError, apply_overrides, check_seed, from_dict, load_yaml, located
from sgdm.data.config import DataConfig
from sgdm.diffusion.config import DiffusionConfig, SamplerConfig
from sgdm.evaluation.config import EvalConfig
from sgdm.models.config import AutoencoderConfig, ModelConfig, UNetConfig
from sgdm.quickstart.config import PrepareConfig
from sgdm.training.config import TrainConfig

__all__ = ["RunConfig", "ExperimentConfig", "load_experiment", "load_recorded", "recorded_config", "check_annotation_store",
           "check_store_dataset", "guidance_classes_key"]


@dataclass
class RunConfig:
    """Where a run lives (``dir/name``) and the one seed every random stream derives from."""

    dir: pathlib.Path = pathlib.Path("runs")
    name: str = "default"
    seed: int = 0

    @property
    def path(self) -> pathlib.Path:
        return self.dir / self.name

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError("name", f"must be a plain directory name, got {self.name!r}")
        check_seed("seed", self.seed)


def guidance_classes_key(kind: str) -> str:
    """The annotation key whose value must equal ``model.guidance.num_classes`` (K)."""
    return "annotation.lost.num_clusters" if kind == "box" else "annotation.num_classes"


@dataclass
class ExperimentConfig:
    """Everything ``sgdm-ldm train`` needs. Sections are documented on their dataclasses."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def validate(self) -> None:
        self._check_guidance()
        report = (("prepare.report_steps", self.prepare.report_steps),) if self.prepare.report else ()
        for key, steps in (("sampler.steps", self.sampler.steps), ("eval.steps", self.eval.steps),
                           ("train.sample_steps", self.train.sample_steps), *report):
            if steps > self.diffusion.timesteps:
                raise ConfigError(key, f"{steps} sampling steps exceed diffusion.timesteps={self.diffusion.timesteps}")
        if self.data.size != self.model.autoencoder.resolution:
            raise ConfigError("model.autoencoder.resolution", f"must equal data.size={self.data.size} (the first "
                                                              f"stage encodes the dataset's images), got "
                                                              f"{self.model.autoencoder.resolution}")
        err = _latent_side_error(self.data.size, self.model.autoencoder.downsample_factor,
                                 self.model.unet.image_size)
        if err is not None:
            raise err
        p = self.prepare
        for stage, key, path in (("autoencoder", "model.autoencoder.checkpoint", self.model.autoencoder.checkpoint),
                                 ("features", "annotation.weights", self.annotation.weights)):
            if getattr(p, stage) and path is None:  # the stage would say so after the stages before it
                raise ConfigError(key, f"prepare.{stage} needs a path to write the "
                                       f"{'autoencoder' if stage == 'autoencoder' else 'encoder'} to")
        if self.prepare.report and not self.train.export_pipeline:  # else found missing after all the training
            raise ConfigError("train.export_pipeline", "false, but prepare.report samples the run's exported pipeline "
                                                       "(and its companion runs'); set it to true, or prepare.report "
                                                       "to false")

    def _check_guidance(self) -> None:
        g, a = self.model.guidance, self.annotation
        if g.kind == "none":
            return  # an explicitly set dropout is refused by load_experiment (the default is harmless)
        if a.granularity != g.kind:
            raise ConfigError("annotation.granularity", f"{a.granularity!r} does not match model.guidance.kind "
                                                        f"{g.kind!r}")
        if a.source != g.source:
            raise ConfigError("annotation.source", f"{a.source!r} does not match model.guidance.source {g.source!r}")
        key = guidance_classes_key(g.kind)
        k = a.lost.num_clusters if g.kind == "box" else a.num_classes
        if k != g.num_classes:
            what = {"label": "cluster count", "box": "box cluster count", "mask": "mask channel count"}[g.kind]
            raise ConfigError("model.guidance.num_classes", f"{what} {g.num_classes} does not match K={k} "
                                                            f"from {key}")


def _latent_side_error(size: int, factor: int, image_size: int) -> ConfigError | None:
    """The UNet's ``image_size`` must be the latent side: it places attention, and the sample grids
    draw noise by it."""
    latent = size // factor
    if image_size == latent:
        return None
    return ConfigError("model.unet.image_size", f"must equal the latent side {latent} = data.size {size} / {factor} "
                                                f"(the downsampling of model.autoencoder.ch_mult), got {image_size}")


def _root_cause(data: dict, err: ConfigError) -> ConfigError:
    """The error to report for ``err``, raised while a section validated itself.

    Sections validate before the checks across them, so an ``image_size`` that is not the latent side
    surfaced as one of its consequences inside ``model.unet`` (an unreachable ``attention_resolutions``
    entry, a side not divisible by the levels). When the written data and first-stage sections are
    valid and the UNet's ``image_size`` (written or default) is not their latent side, that is the cause.
    """
    if not err.key.startswith("model.unet.") or not isinstance(data.get("model", {}), dict):
        return err
    model = data.get("model") or {}
    unet = model.get("unet") or {}
    if not isinstance(unet, dict):
        return err
    try:
        size = from_dict(DataConfig, data.get("data"), "data").size
        factor = from_dict(AutoencoderConfig, model.get("autoencoder"), "model.autoencoder").downsample_factor
        image_size = unet.get("image_size", UNetConfig.image_size)
        if isinstance(image_size, bool) or not isinstance(image_size, int):
            return err
    except ConfigError:
        return err
    return _latent_side_error(size, factor, image_size) or err


def load_recorded(path: str | pathlib.Path) -> ExperimentConfig:
    """A run's recorded config.yaml with the weights files its ``eval:`` section names left out (None),
    unchecked: they may be paths of the machine the run was made on, and loading the run's networks
    (sample, eval from a checkpoint) reads none of them. An evaluation that needs them reads that
    section itself (:func:`sgdm.evaluation.evaluate.recorded_eval`)."""
    return load_experiment(path, ["eval.inception_weights=null", "eval.feature_weights=null"])


def load_experiment(path: str | pathlib.Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """YAML + ``a.b=value`` overrides -> a validated :class:`ExperimentConfig`.

    Beyond the sections' checks: a guidance dropout written in the config (file or override) for a
    model without guidance is refused, since it says the author expected guidance that is not there.
    """
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, overrides, ExperimentConfig)
    try:
        cfg = from_dict(ExperimentConfig, data)
    except ConfigError as err:
        raise located(_root_cause(data, err), data, overrides) from None
    written = ((data.get("model") or {}).get("guidance") or {}) if isinstance(data.get("model"), dict) else {}
    if cfg.model.guidance.kind == "none" and isinstance(written, dict) and cfg.model.guidance.drop_prob > 0 \
            and "drop_prob" in written:
        raise located(ConfigError("model.guidance.drop_prob", f"guidance dropout {cfg.model.guidance.drop_prob} with "
                                                              f"no guidance (model.guidance.kind: none); set it to 0 "
                                                              f"or remove it"), data, overrides)
    return cfg


def recorded_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config as written out (a run's ``config.yaml``, ``--print-config``): an unguided model records
    drop_prob 0 (what it trains with), so that :func:`load_experiment` reads it back without seeing
    dropout written for no guidance."""
    g = cfg.model.guidance
    if g.kind != "none" or g.drop_prob == 0:
        return cfg
    model = dataclasses.replace(cfg.model, guidance=dataclasses.replace(g, drop_prob=0.0))
    return dataclasses.replace(cfg, model=model)


def check_annotation_store(cfg: ExperimentConfig, dataset=None) -> None:
    """The store exists, its manifest agrees with the config, and it holds the dataset's images as they
    are now (:func:`check_store_dataset`: their ids, and the sizes of their files).

    Skipped for unguided runs, and when ``prepare.annotations`` will create it. ``dataset``: the images of
    ``cfg.data``, when built already (training's: their files are stat'ed once per dataset object).
    """
    g = cfg.model.guidance
    if g.kind == "none":
        return
    store = cfg.annotation.store
    if not store.exists():
        if cfg.prepare.annotations:
            return
        raise ConfigError("annotation.store", f"{store} does not exist; run `sgdm-ldm annotate` with this config "
                                              f"first (or set prepare.annotations: true)")
    from sgdm.annotation.store import AnnotationStore

    try:
        opened = AnnotationStore.open(store)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise ConfigError("annotation.store", f"cannot read the annotation store {store}: {err}") from None
    if opened.granularity != g.kind:
        raise ConfigError("model.guidance.kind", f"{g.kind!r} but the annotation store {store} holds "
                                                 f"{opened.granularity!r} annotations")
    if opened.source != g.source:
        raise ConfigError("model.guidance.source", f"{g.source!r} but the annotation store {store} was made "
                                                   f"from {opened.source!r}")
    if opened.num_classes != g.num_classes:
        raise ConfigError("model.guidance.num_classes", f"{g.num_classes} does not match K={opened.num_classes} "
                                                        f"of the annotation store {store}")
    check_store_dataset(opened, cfg.data, dataset)


# data settings that do not decide which images a dataset lists
_NOT_IDS = ("num_workers", "on_bad_image", "flip", "size", "exif_orientation")


def check_store_dataset(opened, data: DataConfig, dataset=None) -> None:
    """The store ``opened`` (an :class:`~sgdm.annotation.store.AnnotationStore`) holds every image of the
    dataset ``data`` describes; else a ConfigError naming ``annotation.store`` and the data setting
    that differs, before any work (training would stop at the first batch with an unknown id).

    Cheap: the dataset lists its ids without reading an image; their hash is compared with the one
    the store recorded. A store made from a larger dataset holding all of them is accepted. Then the
    files of the stored images (:func:`_check_store_files`), one stat each. ``dataset``: the dataset
    ``data`` describes, when built already.

    A box or mask store must also have been annotated from images the same way up
    (``data.exif_orientation``): its boxes and masks lie on that pixel grid. A label store is not
    compared on it: a class is the image's, whichever way up it was read."""
    from sgdm.annotation.store import ids_hash
    from sgdm.data import build_dataset

    recorded = opened.manifest.get("dataset") or {}
    _check_store_orientation(opened, recorded.get("config"), data)
    dataset = build_dataset(data, train=False) if dataset is None else dataset
    ids = dataset.ids
    if ids_hash(ids) in (recorded.get("ids_sha256"), opened.manifest.get("ids_sha256")):
        return _check_store_files(opened, data, dataset)
    skipped = set(recorded.get("skipped") or ())  # unreadable when annotated; training skips them too
    missing = [i for i in ids if i not in opened and i not in skipped]
    if not missing:
        return _check_store_files(opened, data, dataset)
    raise ConfigError("annotation.store", f"{opened.path} was annotated from other images: {len(missing)} of the "
                                          f"dataset's {len(ids)} image ids are not in it (e.g. {missing[0]!r}); "
                                          f"{_data_difference(recorded.get('config'), data)}. Delete the store to "
                                          f"annotate again, or point annotation.store elsewhere")


def _check_store_files(opened, data: DataConfig, dataset) -> None:
    """Refuse the store ``opened`` when a file of an image it holds has another size under ``data.root``
    than when it was annotated (its manifest's ``file_sizes``): an image replaced under the same name,
    whose annotations are of the old pixels. A dataset copied elsewhere keeps its sizes and is accepted.
    Not compared: a store that records no sizes (an older sgdm's), a dataset without files of its own
    per item (shapes, an LMDB), and images the store does not hold (unreadable when annotated)."""
    from sgdm.data.decode import printable
    from sgdm.data.files import item_sizes

    if opened.manifest.get("file_sizes") is None:  # no stat for a store that cannot be compared
        return
    sizes = item_sizes(dataset)
    replaced = None if sizes is None else opened.replaced(dataset.ids, sizes)
    if not replaced:
        return
    shown = ", ".join(printable(i) for i in replaced[:3]) + (", ..." if len(replaced) > 3 else "")
    raise ConfigError("annotation.store", f"{opened.path} is stale: {len(replaced)} of its {len(opened)} images "
                                          f"replaced under data.root {data.root} since they were annotated "
                                          f"(another file size: {shown}), so its annotations describe the old "
                                          f"pixels. Re-run `sgdm-ldm annotate` with this config to annotate "
                                          f"them again")


def _check_store_orientation(opened, old: Optional[dict], data: DataConfig) -> None:
    """Refuse a box or mask store annotated under another ``data.exif_orientation`` (an older store,
    which does not record the key, was annotated with ``ignore``)."""
    from sgdm.data.config import recorded_value

    if opened.granularity == "label" or not isinstance(old, dict):
        return
    made = recorded_value(old, "exif_orientation")
    if made != data.exif_orientation:
        raise ConfigError("data.exif_orientation", f"{data.exif_orientation!r}, but the annotation store {opened.path} "
                                                   f"was annotated from images read with {made!r}: its "
                                                   f"{opened.granularity} annotations lie on that pixel grid. Use "
                                                   f"{made!r}, or annotate again into another annotation.store")


def _data_difference(old: Optional[dict], data: DataConfig) -> str:
    """Which ``data.*`` settings differ from those the store recorded, as words."""
    from sgdm.config.core import to_dict
    from sgdm.data.config import recorded_value

    if not isinstance(old, dict):
        return "the store does not record the data settings it was made from"
    def leaves(d: dict) -> dict:  # nested sections (data.shapes) key by key
        return {f"{k}.{kk}" if isinstance(v, dict) else k: vv for k, v in d.items()
                for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}

    old, new = leaves(old), leaves(to_dict(data))
    differ = [k for k in sorted(set(old) | set(new))
              if k not in _NOT_IDS and recorded_value(old, k) != recorded_value(new, k)]
    if not differ:
        return "the data settings are the same, so the files changed since it was annotated"
    return "; ".join(f"data.{k} differs (store: {recorded_value(old, k)!r}, now: {recorded_value(new, k)!r})"
                     for k in differ)
