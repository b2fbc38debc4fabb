"""``train(cfg)``: build the denoiser, first stage and data, run Lightning, export the EMA weights.

Run directory layout (``run.dir/run.name``)::

    config.yaml            the resolved config of the latest start
    dataset.json           the training images' number, ids and file sizes digests (a resume checks them)
    dataset_files.json.gz  their ids and file sizes, to name what changed (sgdm.training.dataset_record)
    annotation_store.json  the annotation store's path and content digest (guided runs; a resume checks it)
    first_stage.json       model.autoencoder.checkpoint's path and sha256 (a resume with it moved checks it)
    checkpoints/           step-XXXXXXXX.ckpt, written atomically (see sgdm.training.checkpoint)
    logs/                  TensorBoard (or CSV) scalars
    samples/               sample grids, step-XXXXXXXX.png
    pipeline/              EMA weights for SelfGuidedPipeline.from_pretrained
"""
from __future__ import annotations

import json
import pathlib
import warnings
from typing import Optional

import torch

from sgdm.config.core import ConfigError, dump_yaml
from sgdm.config.schema import ExperimentConfig, recorded_config
from sgdm.training.checkpoint import checkpoint_name, clean_leftovers, find_last_valid, list_checkpoints
from sgdm.training.resume import DATASET, FIRST_STAGE, STORE, check_checkpoint_fits, check_checkpoint_trainer, \
    check_resume_compatible, keep_run_first_stage, path_sha256
from sgdm.training.rng import derive_seed

__all__ = ["train", "prepare_run_dir", "check_resumable", "check_resume_compatible", "build_module", "build_trainer",
           "EXIT_SIGTERM", "EXIT_SIGINT"]

EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM
EXIT_SIGINT = 130  # 128 + SIGINT: stopped by Ctrl+C, with a checkpoint


def _first_process() -> bool:
    """The process of a launch that writes the run directory (:mod:`sgdm.launch`)."""
    from sgdm.launch import current

    return current().is_first


def prepare_run_dir(cfg: ExperimentConfig, resume: bool, trainer: str = "diffusion",
                    dataset=None) -> Optional[pathlib.Path]:
    """Create the run dir, clean leftovers, save the resolved config and what its paths hold; the checkpoint
    to resume from.

    ``trainer`` (``diffusion`` or ``autoencoder``) says which settings a resume may change
    (:mod:`sgdm.training.resume`). ``dataset``: the training images, when already built (else built here
    for their record)."""
    run_dir = cfg.run.path
    ckpt_dir = run_dir / "checkpoints"
    if _first_process():
        clean_leftovers(ckpt_dir)
        clean_leftovers(run_dir / "samples")  # a grid being written when the run was stopped
    existing = list_checkpoints(ckpt_dir)
    if resume and not existing:
        raise no_checkpoints_error(cfg)
    if existing and not resume:
        _check_newest_trainer(existing[-1][1], trainer)  # another command's run: --resume would not help
        raise ConfigError("run.name", f"run directory {run_dir} already has checkpoints; pass --resume to continue "
                                      f"it or choose another run.name")
    ckpt = find_last_valid(ckpt_dir) if resume else None
    if resume and existing and ckpt is None:
        raise ConfigError("run.name", f"no readable checkpoint in {ckpt_dir} (all {len(existing)} fail their "
                                      f"integrity check, the newest {existing[-1][1]}: torn or corrupt); start "
                                      f"a new run.name, or put back a good copy")
    if ckpt is not None:
        _say_passed_over(existing, ckpt)
    store = _annotation_store_digest(cfg) if trainer == "diffusion" else None
    images = _training_images(cfg, dataset)
    identities = _identities(cfg, trainer, images, store)
    if ckpt is not None:
        from sgdm.training.dataset_record import check_same_images, describe_change

        check_checkpoint_trainer(ckpt, trainer)
        explain = {DATASET.record: lambda recorded, now: describe_change(run_dir, recorded, now, images())}
        check_resume_compatible(cfg, run_dir / "config.yaml", trainer, identities, explain)
        _check_same_store(run_dir / STORE_RECORD, store)
        check_same_images(run_dir, identities[DATASET.record](), images(), cfg.data)
    if _first_process():
        from sgdm.atomic import atomic_write_text
        from sgdm.training.dataset_record import write_listing

        if ckpt is not None:
            keep_earlier_metrics(run_dir / "logs")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_yaml(recorded_config(cfg)))
        for name, identity in identities.items():
            held = identity()
            if held is not None:
                atomic_write_text(run_dir / name, json.dumps(held, indent=1))
        write_listing(run_dir, images(), identities[DATASET.record]())
    return ckpt


def _training_images(cfg: ExperimentConfig, dataset):
    """The training images: ``dataset`` when built already, else built once when first asked for."""
    import functools

    from sgdm.training.data import build_image_dataset

    return functools.cache(lambda: dataset if dataset is not None else build_image_dataset(cfg.data, cfg.run.seed))


def _identities(cfg: ExperimentConfig, trainer: str, dataset, store: Optional[dict]) -> dict:
    """:attr:`~sgdm.training.resume.Identity.record` -> what the config's paths hold now (None: nothing
    to record), each computed once and only when asked: by the first process, which records them, and by
    the resume checks (:func:`~sgdm.training.resume.check_resume_compatible`,
    :func:`~sgdm.training.dataset_record.check_same_images`). ``dataset``: the training images, when asked."""
    import functools

    @functools.cache
    def images() -> dict:
        from sgdm.training.dataset_record import record

        return record(dataset(), cfg.data.root)

    @functools.cache
    def first_stage() -> Optional[dict]:
        path = cfg.model.autoencoder.checkpoint
        if trainer != "diffusion" or path is None or not path.exists():
            return None
        return {"checkpoint": str(path), "sha256": path_sha256(path)}

    return {DATASET.record: images, STORE.record: lambda: store, FIRST_STAGE.record: first_stage}


def _say_passed_over(existing: list[tuple[int, pathlib.Path]], ckpt: pathlib.Path) -> None:
    """Name the newer checkpoints a resume goes back past (torn or corrupt files): the steps after ``ckpt``
    are trained again, and the files stay until the run writes those steps anew."""
    step = next(s for s, path in existing if path == ckpt)
    passed = [path for s, path in existing if s > step]
    if passed and _first_process():
        import sys

        for path in passed:
            print(f"sgdm: {path} fails its integrity check (torn or corrupt); resuming from {ckpt}",
                  file=sys.stderr, flush=True)


def _check_newest_trainer(ckpt: pathlib.Path, trainer: str) -> None:
    """A run directory holding the other trainer's checkpoints (one config, both commands, one run.name) is
    refused saying so; a checkpoint that cannot be read is left to the usual message."""
    try:
        check_checkpoint_trainer(ckpt, trainer)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - torn or unreadable: the caller's "already has checkpoints" stands
        pass


def no_checkpoints_error(cfg: ExperimentConfig) -> ConfigError:
    """``--resume`` of a run with nothing to resume (often a mistyped run.name): starting it from step 0
    instead could silently begin a long new run."""
    return ConfigError("run.name", f"--resume, but {cfg.run.path} has no checkpoints (run.name={cfg.run.name!r}); "
                                   f"check run.name/run.dir, or drop --resume to start this run")


def check_resumable(cfg: ExperimentConfig, resume: bool) -> None:
    """Before any work: ``resume`` needs a checkpoint in the run dir (see :func:`prepare_run_dir`)."""
    if resume and not list_checkpoints(cfg.run.path / "checkpoints"):
        raise no_checkpoints_error(cfg)


STORE_RECORD = STORE.record  # in the run dir: the guidance labels a run trains on


def _annotation_store_digest(cfg: ExperimentConfig) -> Optional[dict]:
    """{store path, content digest} of a guided run's annotation store (None when unguided, or
    when there is no store yet: training itself then stops on it, naming annotation.store)."""
    if cfg.model.guidance.kind == "none":
        return None
    from sgdm.annotation.store import AnnotationStore

    try:
        store = AnnotationStore.open(cfg.annotation.store)
    except FileNotFoundError:
        return None
    return {"store": str(cfg.annotation.store), "sha256": store.content_digest()}


def _check_same_store(record: pathlib.Path, store: Optional[dict]) -> None:
    """A resume trains on the labels the run started with: the store's content must be unchanged (a moved
    store, only with the same content: :func:`~sgdm.training.resume.check_resume_compatible`). Runs from
    before the record are not checked."""
    if store is None or not record.is_file():
        return
    saved = json.loads(record.read_text())
    if saved.get("sha256") != store["sha256"] and not _same_annotations(store["store"], saved.get("sha256")):
        raise ConfigError("annotation.store", f"{store['store']} holds other annotations than when this run "
                                              f"started (its content digest differs from {record}); resuming would "
                                              f"train on other labels. Start a new run.name, or restore the store")


def _same_annotations(store: str, recorded: Optional[str]) -> bool:
    """Whether the store at ``store`` holds the annotations of digest ``recorded`` though its own digest differs:
    annotated again by a later sgdm with the same settings, which only adds manifest keys
    (:meth:`~sgdm.annotation.store.AnnotationStore.matches_digest`)."""
    from sgdm.annotation.store import AnnotationStore

    return AnnotationStore.open(store).matches_digest(recorded)


def keep_earlier_metrics(log_dir: pathlib.Path) -> Optional[pathlib.Path]:
    """Move ``log_dir/metrics.csv`` to ``metrics-<k>.csv`` (k = 1, 2, ...: the k-th earlier segment of
    the run) and return the new path; None when there is none. Lightning's CSV logger deletes
    ``metrics.csv`` when it starts, which on a resume would lose the history of the steps before it."""
    current = log_dir / "metrics.csv"
    if not current.is_file():
        return None
    k = 1
    while (log_dir / f"metrics-{k}.csv").exists():
        k += 1
    return current.rename(log_dir / f"metrics-{k}.csv")


def _seeded_build(seed: int, fn):
    """Module init draws from the global RNG inside torch.nn; fork it so nothing leaks out."""
    from sgdm.training.rng import seeded_cpu_rng

    with seeded_cpu_rng(seed):
        return fn()


def build_first_stage(cfg: ExperimentConfig):
    from sgdm.models.autoencoder import AutoencoderKL

    ae_cfg = cfg.model.autoencoder
    if ae_cfg.checkpoint is not None:
        from sgdm.models.checkpoints import load_autoencoder

        return load_autoencoder(ae_cfg.checkpoint, ae_cfg)
    warnings.warn("model.autoencoder.checkpoint is not set: training on the latents of a randomly initialised "
                  "autoencoder (fine for tests, useless for real images)", stacklevel=2)
    return _seeded_build(derive_seed(cfg.run.seed, "init-first-stage"), lambda: AutoencoderKL(ae_cfg))


def check_first_stage_file(cfg: ExperimentConfig) -> None:
    """``model.autoencoder.checkpoint`` exists (a file, or a diffusers model folder), before anything is built."""
    path = cfg.model.autoencoder.checkpoint
    if path is not None and not path.exists():
        prepare = " (or set prepare.autoencoder: true to train it first)" if cfg.prepare.any() else ""
        raise ConfigError("model.autoencoder.checkpoint", f"{path} does not exist; train one with `sgdm-ldm "
                                                          f"train-autoencoder` or point the key at an existing "
                                                          f"file{prepare}")


def check_batch_fits(train_cfg, num_images: int) -> None:
    """A global micro-batch (``batch_size / accumulate`` images) must fit in the dataset: each data epoch
    drops its incomplete last batch, so a larger one would never be filled."""
    micro = train_cfg.batch_size // train_cfg.accumulate
    if micro > num_images:
        raise ConfigError("train.batch_size", f"{train_cfg.batch_size} (with train.accumulate={train_cfg.accumulate}"
                                              f": {micro} images per micro-batch) is larger than the dataset "
                                              f"({num_images} images); lower it or use more data")


def build_module(cfg: ExperimentConfig, first_stage=None, dataset=None):
    """The LightningModule, with its data factory; weights initialised from (run.seed, "init").
    ``dataset``: the training images, when already built (else built when Lightning asks for data)."""
    from sgdm.diffusion.schedule import make_schedule
    from sgdm.models.conditioning import condition_dims
    from sgdm.models.unet import UNet
    from sgdm.training.conditions import GuidanceLookup
    from sgdm.training.module import LatentDiffusionModule

    cond_dim, cond_channels = condition_dims(cfg.model.guidance)
    unet = _seeded_build(derive_seed(cfg.run.seed, "init-unet"), lambda: UNet(cfg.model.unet, cond_dim, cond_channels))
    first_stage = build_first_stage(cfg) if first_stage is None else first_stage
    guidance = GuidanceLookup(cfg.model.guidance, cfg.annotation.store)
    return LatentDiffusionModule(unet, first_stage, make_schedule(cfg.diffusion), cfg.diffusion, cfg.train, guidance,
                                 cfg.model.guidance.drop_prob, cfg.run.seed, train_loader=_loader_factory(cfg, dataset))


def _loader_factory(cfg: ExperimentConfig, images=None):
    from sgdm.training.data import build_image_dataset, build_train_loader, flip_image_sample

    def make(module):
        trainer = module.trainer
        world, rank = trainer.world_size, trainer.global_rank
        if cfg.train.cache_latents:
            from sgdm.training.latent_cache import LatentCacheDataset, cache_dir_for, flip_latent_sample

            dataset, flip_fn = LatentCacheDataset(cache_dir_for(cfg)), flip_latent_sample
        else:
            dataset = images if images is not None else build_image_dataset(cfg.data, cfg.run.seed)
            flip_fn = flip_image_sample
        return build_train_loader(dataset, flip_fn, global_micro_batch=cfg.train.micro_batch(world) * world,
                                  total_positions=cfg.train.max_steps * cfg.train.accumulate, seed=cfg.run.seed,
                                  flip=cfg.data.flip, rank=rank, world_size=world,
                                  start=lambda: module.next_position, num_workers=cfg.data.num_workers,
                                  pin_memory=module.device.type == "cuda")

    return make


def _logger(cfg: ExperimentConfig):
    from pytorch_lightning.loggers import TensorBoardLogger

    if cfg.train.logger == "none":
        return False
    if cfg.train.logger == "tensorboard":
        try:
            import tensorboard  # noqa: F401

            return TensorBoardLogger(save_dir=str(cfg.run.path), name="logs", version="")
        except ImportError:
            warnings.warn("tensorboard is not installed; logging to CSV in logs/ instead", stacklevel=2)
    return _csv_logger_class()(save_dir=str(cfg.run.path), name="logs", version="")


def _csv_logger_class():
    from pytorch_lightning.loggers import CSVLogger

    class SegmentedCSVLogger(CSVLogger):
        """Lightning's CSV logger, without its warning that a non-empty log directory's "previous log
        files will be deleted": it deletes only ``metrics.csv``, which :func:`keep_earlier_metrics` has
        moved aside on a resume, so the warning would only alarm."""

        @property
        def experiment(self):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
                return super().experiment

    return SegmentedCSVLogger


def _strategy(t, unused_parameters: bool):
    """Lightning's strategy for ``train.strategy``. ``unused_parameters``: some trained parameters get no
    gradient in some backward passes (the autoencoder's discriminator before ``disc_start``, its
    generator in the discriminator's pass), which plain DDP refuses at the next step; DDP then looks
    for them after each backward (a graph walk per step)."""
    if not unused_parameters or t.strategy == "fsdp" or t.world_size() == 1:
        return t.strategy
    return "ddp_find_unused_parameters_true"  # "auto" with several processes is DDP as well


def _plugins() -> list:
    """Atomic checkpoint files; under srun, SLURM's environment without Lightning's auto-requeue: on SIGUSR1
    that would write a checkpoint of its own (``hpc_ckpt_*.ckpt``, not atomic, not sgdm's) and resume from
    it on the next start, past ``--resume``'s checks. sgdm's own answer to SLURM's SIGTERM is a checkpoint
    and exit code 143 (docs/training.md)."""
    from sgdm.launch import srun_launched
    from sgdm.training.checkpoint import AtomicCheckpointIO

    if not srun_launched():
        return [AtomicCheckpointIO()]
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return [AtomicCheckpointIO(), SLURMEnvironment(auto_requeue=False)]


def build_trainer(cfg: ExperimentConfig, extra_callbacks=(), unused_parameters: bool = False):
    """The Lightning Trainer for ``cfg.train``; ``unused_parameters``: see :func:`_strategy`."""
    import pytorch_lightning as pl

    from sgdm.training.callbacks import StepCheckpoint
    from sgdm.training.sample_grid import SampleGrid

    t = cfg.train
    callbacks = [StepCheckpoint(cfg.run.path / "checkpoints", t.checkpoint_every, t.keep_checkpoints)]
    if t.sample_every:
        callbacks.append(SampleGrid(cfg, cfg.run.path / "samples"))
    callbacks.extend(extra_callbacks)
    accelerator = "gpu" if t.accelerator == "cuda" else t.accelerator
    return pl.Trainer(accelerator=accelerator, devices=t.devices, num_nodes=t.num_nodes,
                      strategy=_strategy(t, unused_parameters),
                      precision=t.precision_name, max_epochs=-1, max_steps=-1, logger=_logger(cfg),
                      callbacks=callbacks, plugins=_plugins(), use_distributed_sampler=False,
                      enable_checkpointing=False, log_every_n_steps=t.log_every * t.accumulate,
                      enable_progress_bar=t.progress_bar, enable_model_summary=False,
                      default_root_dir=str(cfg.run.path), num_sanity_val_steps=0, limit_val_batches=0)


def _say_when_finished(cfg: ExperimentConfig, ckpt: pathlib.Path) -> None:
    """A resume of a run already at ``train.max_steps`` trains nothing (it only exports again): say so,
    naming the key to raise; otherwise only Lightning's "Restored all states" would show."""
    step = next((s for s, path in list_checkpoints(ckpt.parent) if path == ckpt), None)
    if step is not None and step >= cfg.train.max_steps and _first_process():
        import sys

        print(f"sgdm: {cfg.run.path} is already at step {step} of train.max_steps={cfg.train.max_steps}: nothing "
              f"to train; raise train.max_steps to continue it", file=sys.stderr, flush=True)


def stopped(cfg: ExperimentConfig, trainer) -> int:
    """:data:`EXIT_SIGINT` when this process was stopped by Ctrl+C, else :data:`EXIT_SIGTERM`, after the
    first process says which checkpoint the signal left and how to go on."""
    from sgdm.training.callbacks import StepCheckpoint

    step_checkpoint = next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)
    name = step_checkpoint.signal_name if step_checkpoint is not None else None
    if _first_process():
        import sys

        saved = step_checkpoint.last_saved if step_checkpoint is not None else None
        where = (f"; wrote {cfg.run.path / 'checkpoints' / checkpoint_name(saved)}" if saved is not None
                 else "; no checkpoint written in this start")
        by = {"SIGINT": "Ctrl+C", "SIGTERM": "SIGTERM"}.get(name, "a signal to another process")
        print(f"sgdm: stopped by {by}{f' at step {saved}' if saved is not None else ''}{where}; continue with "
              f"the same command and --resume (or --auto-resume)", file=sys.stderr, flush=True)
    return EXIT_SIGINT if name == "SIGINT" else EXIT_SIGTERM


def encode_device(t) -> torch.device:
    """Where the first stage encodes the latent cache and the scale factor's sample before training:
    this process's GPU when training runs on GPUs (a DDP process started by Lightning has its
    LOCAL_RANK; the first one builds the cache before it starts the others; torchrun and srun set theirs,
    see :mod:`sgdm.launch`), else the CPU."""
    if t.accelerator != "cpu" and torch.cuda.is_available():
        from sgdm.launch import local_gpu

        return torch.device("cuda", local_gpu())
    return torch.device("cpu")


def train(cfg: ExperimentConfig, resume: bool = False, callbacks=(), dataset=None) -> int:
    """Train (or continue) the run ``cfg.run.path``; 0 when done, :data:`EXIT_SIGTERM` after a SIGTERM,
    :data:`EXIT_SIGINT` after Ctrl+C (both with a checkpoint).

    ``callbacks``: extra Lightning callbacks (monitoring, tests). ``dataset``: the training images
    (:func:`~sgdm.training.data.build_image_dataset`) when the caller built them for its checks already:
    their files' sizes are taken once per dataset object (:mod:`sgdm.data.files`).
    """
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from sgdm.training.data import build_image_dataset

    # the cheap checks first: nothing is written, no scale factor or latent cache computed, before them
    check_first_stage_file(cfg)
    dataset = build_image_dataset(cfg.data, cfg.run.seed) if dataset is None else dataset
    check_batch_fits(cfg.train, len(dataset))
    ckpt = prepare_run_dir(cfg, resume, dataset=dataset)
    if ckpt is not None:
        _say_when_finished(cfg, ckpt)
    module = build_module(cfg, dataset=dataset)
    if ckpt is not None:
        check_checkpoint_fits(module, ckpt)
        keep_run_first_stage(module.first_stage, ckpt, cfg.model.autoencoder.checkpoint or "(not set: random init)")
    module.first_stage.to(encode_device(cfg.train))
    if cfg.train.cache_latents:
        # on a resume too: a complete cache is kept as it is, a missing one (a continuation in
        # a new run dir, a deleted cache) is rebuilt
        from sgdm.training.latent_cache import ensure_latent_cache

        ensure_latent_cache(cfg, module.first_stage, dataset=dataset)
    if ckpt is None:
        from sgdm.training.scale import ensure_scale_factor

        ensure_scale_factor(cfg, module)
    module.first_stage.to("cpu")  # Lightning places the whole module
    trainer = build_trainer(cfg, callbacks)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # frozen first stage, EMA
            trainer.fit(module, ckpt_path=str(ckpt) if ckpt is not None else None)
    except SIGTERMException:
        return stopped(cfg, trainer)
    if trainer.received_sigterm:
        return stopped(cfg, trainer)
    if cfg.train.export_pipeline and trainer.is_global_zero:
        from sgdm.training.export import export_pipeline

        export_pipeline(cfg, module, cfg.run.path / "pipeline")
    return 0
