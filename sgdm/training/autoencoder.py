"""First-stage training: the KL autoencoder with LDM's losses (``sgdm.models.autoencoder_losses``).

Manual optimisation with two optimizers, as LDM: Adam(beta = 0.5, 0.9) on the
autoencoder and the loss's learned ``logvar`` for
:meth:`AutoencoderLoss.generator_loss` (L1 + LPIPS + KL, plus the adaptive
hinge-GAN term from ``model.autoencoder.loss.disc_start``), and Adam on the
PatchGAN discriminator for :meth:`AutoencoderLoss.discriminator_loss` once it
is active. Data order, checkpoints, resume and SIGTERM behave as for the
denoiser (same sampler, same atomic step checkpoints); at the end the weights
go to ``model.autoencoder.checkpoint`` in the LDM autoencoder layout, which
:func:`sgdm.models.checkpoints.load_autoencoder` reads.

Gradient accumulation (``train.accumulate`` = A): optimiser step s spans the global
micro-batches at positions s*A .. s*A + A - 1 (:mod:`sgdm.training.data_order`). Each
micro-batch back-propagates its generator loss / A into the autoencoder only and its
discriminator loss / A into the discriminator only (``toggle_model``), so the summed
gradients are those of the batch mean; both optimizers step after the last one. The
adaptive GAN weight is a ratio of gradient norms, computed per micro-batch as LDM does
per batch. ``step`` (``disc_start``, checkpoints, resume) counts optimiser steps.
"""
from __future__ import annotations

import dataclasses
import pathlib
import warnings
from typing import Optional

import pytorch_lightning as pl
import torch

from sgdm.training.data import HostBatchKeys, is_empty, no_readable_image
from sgdm.training.host_log import HostLogging
from sgdm.training.rng import derive_seed, generator_for, seeded_global_rng

__all__ = ["AutoencoderModule", "train_autoencoder", "save_autoencoder", "check_loss_files", "posterior_sample"]


def posterior_sample(posterior, generator: torch.Generator, total: Optional[int] = None,
                     rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """z ~ q(z|x) for the B images at ``rows`` (CPU int64 [B]) of an optimiser step's batch of ``total``
    images (all of them, in order, by default). The noise is drawn for the whole batch from ``generator``
    (seeded by the step, the same on every rank) and each image takes its row's: row = m * G + slot for
    the image at ``slot`` of global micro-batch m of the step (G images each, :mod:`sgdm.training.data_order`),
    so each rank and micro-batch gets its own noise, several devices or micro-batches draw what one batch
    would, and an image keeps its noise whichever others were dropped as unreadable."""
    b = posterior.mean.shape[0]
    total = b if total is None else total
    rows = torch.arange(b) if rows is None else rows
    noise = torch.randn((total, *posterior.mean.shape[1:]), generator=generator)[rows]
    return posterior.mean + posterior.std * noise.to(posterior.mean)


class AutoencoderModule(HostBatchKeys, HostLogging, pl.LightningModule):
    """AutoencoderKL + AutoencoderLoss trained on ``train`` (lr, accumulate, max_steps of a
    :class:`~sgdm.training.config.TrainConfig`); ``step`` counts optimiser steps (the resume position)."""

    def __init__(self, autoencoder, loss, train, seed: int, train_loader=None):
        super().__init__()
        self.automatic_optimization = False
        self.autoencoder, self.loss = autoencoder, loss
        self.lr, self.accumulate, self.max_steps = train.lr, train.accumulate, train.max_steps
        self.batch_size, self.log_every = train.batch_size, train.log_every
        self.seed, self._train_loader = seed, train_loader
        self.step = 0
        self._step_samples = 0  # readable images of this rank in the step's micro-batches so far

    @property
    def next_position(self) -> int:
        """First micro-batch position of the next optimiser step (a resume redoes a partial accumulation)."""
        return self.step * self.accumulate

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sgdm"] = {"step": self.step}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.step = int(checkpoint["sgdm"]["step"])

    def configure_optimizers(self):
        ae_params = list(self.autoencoder.parameters()) + [self.loss.logvar]
        opt_ae = torch.optim.Adam(ae_params, lr=self.lr, betas=(0.5, 0.9))
        opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=self.lr, betas=(0.5, 0.9))
        return [opt_ae, opt_disc]

    def train_dataloader(self):
        return self._train_loader(self)

    def training_step(self, batch: dict, batch_idx: int):
        opt_ae, opt_disc = self.optimizers()
        position, world, rank = int(batch["position"][0]), self.trainer.world_size, self.trainer.global_rank
        micro = position - self.next_position
        if not 0 <= micro < self.accumulate:
            raise RuntimeError(f"micro-batch at position {position} is not part of optimiser step {self.step} "
                               f"(train.accumulate={self.accumulate})")
        last = micro == self.accumulate - 1
        disc_active = self.loss.disc_factor(self.step) > 0
        if micro == 0:
            self._step_samples = 0
        if is_empty(batch):
            self._take_part(opt_ae, opt_disc if disc_active else None, last)
            if last:
                self._finish_step(opt_ae, opt_disc if disc_active else None)
            return
        self._step_samples += len(batch["slot"])
        x = batch["image"]
        # toggle_model: only this optimizer's parameters take gradients (the generator loss runs through
        # the discriminator); sync_grad=False: DDP's no_sync until the step's last micro-batch
        with opt_ae.toggle_model(sync_grad=last):
            with seeded_global_rng(x.device, self.seed, "autoencoder-dropout", position, rank):
                posterior = self.autoencoder.encode(x)
                gen = generator_for(self.seed, "autoencoder", self.step)  # the step's, not the micro-batch's
                g = self.batch_size // self.accumulate  # the global micro-batch, all ranks
                rec = self.autoencoder.decode(posterior_sample(posterior, gen, self.accumulate * g,
                                                               micro * g + batch["slot"]))
            loss, logs = self.loss.generator_loss(x, rec, posterior, self.step,
                                                  last_layer=self.autoencoder.decoder.conv_out.weight)
            self.manual_backward(loss / self.accumulate)
        if disc_active:
            with opt_disc.toggle_model(sync_grad=last):
                d_loss, d_logs = self.loss.discriminator_loss(x, rec, self.step)
                self.manual_backward(d_loss / self.accumulate)
            logs.update(d_logs)
        # device tensors for the loggers (read at their cadence only); the bar gets host copies (HostLogging)
        self.log_dict({f"autoencoder/{k}": torch.as_tensor(v).detach() for k, v in logs.items()}, on_step=True)
        self.log("autoencoder/loss", loss.detach(), on_step=True)
        self._log_bar_loss(loss.detach(), self.step, last, self.log_every)
        if last:
            self._finish_step(opt_ae, opt_disc if disc_active else None)

    def _take_part(self, opt_ae, opt_disc, last: bool) -> None:
        """A micro-batch slice without a readable image (data.on_bad_image: skip) adds nothing; its backward
        passes still run (a zero gradient for each optimizer's parameters), so that the step's DDP
        all-reduces happen on every rank."""
        for opt, params in ((opt_ae, [*self.autoencoder.parameters(), self.loss.logvar]),
                            (opt_disc, list(self.loss.discriminator.parameters()) if opt_disc is not None else [])):
            if opt is not None:
                with opt.toggle_model(sync_grad=last):
                    self.manual_backward(sum(p.sum() for p in params) * 0.0)

    def _check_readable(self) -> None:
        """Stop, on every rank together, at a step with no readable image on any rank (one all-reduce per
        step under DDP: a rank that stopped alone would leave the others waiting in the next collective)."""
        samples = self._step_samples
        if self.trainer.world_size > 1:
            samples = int(self.trainer.strategy.reduce(torch.tensor(samples, device=self.device), reduce_op="sum"))
        if not samples:
            raise no_readable_image(self.step, self.accumulate)

    def _finish_step(self, opt_ae, opt_disc) -> None:
        """Step the autoencoder's optimizer, then the discriminator's (``opt_disc``: None while inactive).
        Under 16-mixed, Lightning ends each step with the GradScaler's update, which may change the loss
        scale (halved after an overflow, doubled after 2000 clean steps); the discriminator's gradients,
        made at the old scale, are brought to the new one, which its step divides them by."""
        self._check_readable()
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if opt_disc is not None else None
        scale = scaler.get_scale() if scaler is not None else None  # GradScaler.step syncs the host anyway
        opt_ae.step()
        opt_ae.zero_grad(set_to_none=True)
        if opt_disc is not None:
            if scale is not None and scaler.get_scale() != scale:
                grads = [p.grad for p in self.loss.discriminator.parameters() if p.grad is not None]
                torch._foreach_mul_(grads, scaler.get_scale() / scale)
            opt_disc.step()
            opt_disc.zero_grad(set_to_none=True)
        self.step += 1
        if self.step >= self.max_steps:
            self.trainer.should_stop = True

    def on_train_start(self) -> None:
        if self.step >= self.max_steps:
            self.trainer.should_stop = True


def save_autoencoder(autoencoder, path: pathlib.Path) -> None:
    """Atomically write the LDM-layout state dict (``.safetensors``, else a torch ``{"state_dict": ...}``),
    with the settings the weights cannot tell (:func:`sgdm.models.checkpoints.settings_record`)."""
    from sgdm.atomic import atomic_path, atomic_torch_save
    from sgdm.models.checkpoints import SETTINGS_KEY, settings_record

    state = {k: v.detach().cpu().contiguous() for k, v in autoencoder.state_dict().items()}
    if not bool(torch.isfinite(state["scale_factor"])):
        del state["scale_factor"]  # not computed yet: the diffusion run computes it
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=settings_record(autoencoder.cfg))
    else:
        atomic_torch_save({"state_dict": state, SETTINGS_KEY: settings_record(autoencoder.cfg)}, path)


def training_record_path(checkpoint) -> pathlib.Path:
    """The file beside an autoencoder ``checkpoint`` that names the run directory which trained it."""
    checkpoint = pathlib.Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.name}.run.json")


def write_training_record(checkpoint, run_dir) -> None:
    """Record beside ``checkpoint`` that ``run_dir`` (its ``config.yaml``) trained it, with the file's digest,
    so that whoever reuses the file later compares settings with that run, whatever its own run is called."""
    import json

    from sgdm.annotation.features import file_sha256
    from sgdm.atomic import atomic_write_text

    record = {"run": str(pathlib.Path(run_dir).resolve()), "sha256": file_sha256(checkpoint)}
    atomic_write_text(training_record_path(checkpoint), json.dumps(record, indent=1) + "\n")


def trained_by(checkpoint) -> pathlib.Path | None:
    """The run directory that trained the autoencoder ``checkpoint`` (see :func:`write_training_record`), or
    None: no record (weights made elsewhere, or by an older sgdm), or the file was replaced since."""
    import json

    from sgdm.annotation.features import file_sha256

    try:
        record = json.loads(training_record_path(checkpoint).read_text())
        run, digest = pathlib.Path(record["run"]), record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run if digest == file_sha256(checkpoint) else None


def _build(cfg):
    from sgdm.models.autoencoder import AutoencoderKL
    from sgdm.models.autoencoder_losses import AutoencoderLoss
    from sgdm.training.run import _seeded_build

    ae_cfg = dataclasses.replace(cfg.model.autoencoder, checkpoint=None)
    return _seeded_build(derive_seed(cfg.run.seed, "init-autoencoder"),
                         lambda: (AutoencoderKL(ae_cfg), AutoencoderLoss(ae_cfg.loss, ae_cfg.in_channels)))


def check_loss_files(cfg) -> None:
    """The LPIPS files ``model.autoencoder.loss`` names exist, before anything is built or written
    (:func:`sgdm.models.autoencoder_losses.build_lpips` would stop on them only after the run dir is made)."""
    from sgdm.config.core import ConfigError
    from sgdm.models.autoencoder_losses import default_lpips_heads

    loss = cfg.model.autoencoder.loss
    if loss.perceptual_weight == 0:
        return
    if loss.vgg16_weights is not None and not loss.vgg16_weights.is_file():
        raise ConfigError("model.autoencoder.loss.vgg16_weights", f"{loss.vgg16_weights} is not a file; point it at "
                                                                  f"a torchvision VGG16 state dict")
    if loss.vgg16_weights is None and not loss.vgg16_download:
        return  # no perceptual term (build_lpips warns)
    if loss.lpips_heads is not None and not loss.lpips_heads.is_file():
        raise ConfigError("model.autoencoder.loss.lpips_heads", f"{loss.lpips_heads} is not a file; point it at "
                                                                f"LPIPS' vgg.pth linear heads")
    if loss.lpips_heads is None and default_lpips_heads() is None:
        raise ConfigError("model.autoencoder.loss.lpips_heads", "not set, and torchmetrics' copy of LPIPS' vgg.pth "
                                                                "is not installed; point the key at the file")


def train_autoencoder(cfg, resume: bool | None = None, callbacks=()) -> int:
    """Train the first stage of ``cfg`` in ``run.dir/run.name`` for ``train.max_steps`` steps and write
    ``model.autoencoder.checkpoint``. Returns 0, or 143 after a SIGTERM, 130 after Ctrl+C. ``resume``: None
    continues the run when it has checkpoints (what ``prepare`` wants after an interruption); True/False as ``--resume``.
    A new run refuses a checkpoint path that already exists (often a downloaded first stage), and any run a
    configured ``model.autoencoder.scale_factor`` (it belongs to other weights), before any work.
    ``callbacks``: extra Lightning callbacks (monitoring, tests)."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from sgdm.config.core import ConfigError
    from sgdm.training.data import build_image_dataset
    from sgdm.training.run import _loader_factory, _say_when_finished, build_trainer, check_batch_fits, \
        prepare_run_dir, stopped

    target = cfg.model.autoencoder.checkpoint
    if target is None:
        raise ConfigError("model.autoencoder.checkpoint", "train-autoencoder needs a path to write the weights to")
    # no sample grids, pipeline or latent cache: those are the denoiser's
    t = dataclasses.replace(cfg.train, sample_every=0, export_pipeline=False, cache_latents=False)
    cfg = dataclasses.replace(cfg, train=t)
    t.micro_batch(t.world_size() or 1)  # a config built in code (the quickstart's) was not validated
    if t.compile:
        warnings.warn("train.compile compiles the denoiser of `sgdm-ldm train`; the autoencoder trains without "
                      "torch.compile", stacklevel=2)
    if resume is None:
        from sgdm.training.checkpoint import list_checkpoints

        resume = bool(list_checkpoints(cfg.run.path / "checkpoints"))
    check_loss_files(cfg)
    if cfg.model.autoencoder.scale_factor is not None:
        raise ConfigError("model.autoencoder.scale_factor", f"{cfg.model.autoencoder.scale_factor} is set, the value "
                                                            f"of another autoencoder's latents (as in the paper "
                                                            f"configs, for LDM's own weights); the diffusion run "
                                                            f"would scale this new autoencoder's latents by it. Set "
                                                            f"it to null in the config, so that the diffusion run "
                                                            f"computes 1/std of these latents")
    if not resume and target.exists():
        # (a resumed run may find the file its own earlier segment wrote)
        raise ConfigError("model.autoencoder.checkpoint", f"{target} already exists; train-autoencoder writes the "
                                                          f"weights it trains there at the end and would replace it. "
                                                          f"Point the key at a new file, or move the old one away")
    dataset = build_image_dataset(cfg.data, cfg.run.seed)
    check_batch_fits(t, len(dataset))
    ckpt = prepare_run_dir(cfg, resume, trainer="autoencoder", dataset=dataset)
    if ckpt is not None:
        _say_when_finished(cfg, ckpt)
    autoencoder, loss = _build(cfg)
    module = AutoencoderModule(autoencoder, loss, t, cfg.run.seed, _loader_factory(cfg, dataset))
    if ckpt is not None:
        from sgdm.training.resume import check_checkpoint_fits

        check_checkpoint_fits(module, ckpt)
    # unused parameters: the discriminator, idle before disc_start and in the generator's backward
    trainer = build_trainer(cfg, callbacks, unused_parameters=True)
    try:
        trainer.fit(module, ckpt_path=str(ckpt) if ckpt is not None else None)
    except SIGTERMException:
        return stopped(cfg, trainer)
    if trainer.received_sigterm:
        return stopped(cfg, trainer)
    if trainer.is_global_zero:
        save_autoencoder(module.autoencoder, target)
        write_training_record(target, cfg.run.path)
        print(f"sgdm: wrote the autoencoder to {target} (model.autoencoder.checkpoint)", flush=True)
    return 0
