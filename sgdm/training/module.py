"""The Lightning module that trains the latent denoiser (LDM Eq. 2 with self-guidance, paper Sec. 3).

One training step, for the global micro-batch at position p (``accumulate``
positions per optimiser step; see :mod:`sgdm.training.data_order`):

    z_0 = scale * (mu + sigma * n)          first-stage posterior sample, n ~ N(0, I)
    t ~ U{0..T-1},  eps ~ N(0, I)           x_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps
    (k, k_s) = guidance(sample) zeroed with probability p_drop (classifier-free training)
    loss = mean_b || eps - eps_theta(x_t, t, k, k_s) ||^2      (or l1, or v-prediction)
    (the gradient's: a sum over the readable samples / batch_size, see training_step)

All draws come from a generator seeded by (run seed, position) over the
global micro-batch; each rank keeps its slice (exact resume, DDP == 1 device).
Optimisation is manual so that a non-finite step can be skipped without
touching the weights, the optimiser state or the EMA.
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Callable, Optional, Union

import pytorch_lightning as pl
import torch
from torch import nn

from sgdm.diffusion.config import DiffusionConfig
from sgdm.diffusion.losses import diffusion_loss, sample_timesteps
from sgdm.diffusion.schedule import NoiseSchedule
from sgdm.training.conditions import GuidanceLookup, apply_keep_mask, dropout_keep_mask
from sgdm.training.config import TrainConfig
from sgdm.training.data import HostBatchKeys, is_empty, no_readable_image
from sgdm.training.ema import ema_decay, update_ema
from sgdm.training.host_log import HostLogging
from sgdm.training.rng import generator_for, seeded_global_rng

__all__ = ["LatentDiffusionModule", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A non-finite loss or gradient under ``on_nan: raise`` (or too many consecutive skips)."""


class LatentDiffusionModule(HostBatchKeys, HostLogging, pl.LightningModule):
    """Denoiser + EMA copy + frozen first stage.

    unet: ``UNet``; first_stage: autoencoder with ``encode(x) -> posterior(mean, logvar)``
    and a ``scale_factor`` buffer; guidance: :class:`GuidanceLookup`;
    train_loader: ``fn(module) -> DataLoader`` (built when Lightning asks, after a resume restored ``step``).
    """

    def __init__(self, unet: nn.Module, first_stage: nn.Module, schedule: NoiseSchedule, diffusion: DiffusionConfig,
                 train: TrainConfig, guidance: GuidanceLookup, drop_prob: float, seed: int,
                 train_loader: Optional[Callable[["LatentDiffusionModule"], object]] = None):
        super().__init__()
        self.automatic_optimization = False
        self.unet = unet
        self.ema = copy.deepcopy(unet).requires_grad_(False).eval()
        if train.compile:  # after the EMA copy, which stays eager (it only samples grids and is exported)
            from sgdm.models.compile import compile_network

            compile_network(self.unet, train.compile_mode)
        self.first_stage = first_stage.requires_grad_(False).eval()
        self.schedule, self.diffusion_cfg, self.train_cfg = schedule, diffusion, train
        self.guidance, self.drop_prob, self.seed = guidance, drop_prob, seed
        self._train_loader = train_loader
        self.step = 0  # optimiser steps attempted (incl. skipped ones)
        self.ema_updates = 0
        self.nan_skips = 0
        self.consecutive_nan = 0
        self._step_finite = True
        self._step_samples = 0  # readable samples of this rank in the step's micro-batches so far
        self._draws_global_rng = any(isinstance(m, nn.Dropout) and m.p > 0 for m in unet.modules())
        self._last_step_time: Optional[float] = None

    # -- state that Lightning does not know about -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sgdm"] = {"step": self.step, "ema_updates": self.ema_updates, "nan_skips": self.nan_skips,
                              "consecutive_nan": self.consecutive_nan}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("sgdm")
        if state is None:
            raise KeyError("checkpoint has no 'sgdm' training state; it was not written by sgdm-ldm train")
        self.step, self.ema_updates = int(state["step"]), int(state["ema_updates"])
        self.nan_skips, self.consecutive_nan = int(state["nan_skips"]), int(state["consecutive_nan"])

    @property
    def next_position(self) -> int:
        """First micro-batch position of the next optimiser step (a resume redoes a partial accumulation)."""
        return self.step * self.train_cfg.accumulate

    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage.eval()  # frozen: no dropout, fixed statistics
        self.ema.eval()
        return self

    # -- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        c = self.train_cfg
        opt = torch.optim.AdamW(self.unet.parameters(), lr=c.lr, betas=tuple(c.betas), eps=c.adam_eps,
                                weight_decay=c.weight_decay, fused=True if self._fused_adamw() else None)
        warmup = c.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _fused_adamw(self) -> bool:
        """Whether AdamW takes its fused kernel: on the CPU outside Lightning's mixed precision (which refuses
        gradient clipping for a fused optimiser, as one that may unscale fp16 gradients itself). The CPU's default
        updates the 148 tensors of the quickstart UNet one by one, ten ops each: 21 ms a step on one thread,
        6 ms fused; the quickstart's step went from 395 to 358 ms (benchmarks/train_bench.py --cache-latents
        --clock cpu, one thread). The fused update differs from the per-tensor one by rounding only. Elsewhere
        PyTorch's default stays (foreach on CUDA)."""
        from pytorch_lightning.plugins.precision import MixedPrecision

        if not all(p.device.type == "cpu" for p in self.unet.parameters()):
            return False
        return self._trainer is None or not isinstance(self.trainer.precision_plugin, MixedPrecision)

    def train_dataloader(self):
        if self._train_loader is None:
            raise RuntimeError("LatentDiffusionModule was built without a train_loader factory")
        return self._train_loader(self)

    def _rank(self) -> int:
        return self.trainer.global_rank if self._trainer is not None else 0

    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _global_size(self) -> int:
        """G, the number of samples in a global micro-batch (all ranks)."""
        world = self._world()
        return self.train_cfg.micro_batch(world) * world

    def _rows(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The rows of draws ``x`` (one per slot of the global micro-batch) of this rank's samples, on the device."""
        return _to_device(x[slots], self.device)

    @torch.no_grad()
    def latents(self, batch: dict, generator: torch.Generator, global_size: int) -> torch.Tensor:
        """z_0 = scale * posterior sample from images (encoded here) or cached (mean, logvar), float32;
        the posterior noise is drawn for the ``global_size`` slots and picked by ``batch["slot"]``.

        float32 even where autocast ran the encoder in bf16/fp16: the sample, the scale factor and so the
        noise target and x_t are then those of the latent cache (float32), not rounded to 8 bits."""
        if "image" in batch:
            posterior = self.first_stage.encode(batch["image"])
            mean, logvar = posterior.mean.float(), posterior.logvar.float()
        else:
            mean, logvar = batch["mean"].float(), batch["logvar"].float()
        n = torch.randn((global_size, *mean.shape[1:]), generator=generator)
        z = mean + torch.exp(0.5 * logvar) * self._rows(n, batch["slot"])
        return z * self.first_stage.scale_factor.float()

    def training_step(self, batch: dict, batch_idx: int):
        position = int(batch["position"][0])
        step, micro = divmod(position, self.train_cfg.accumulate)
        if micro == 0:
            self._step_finite, self._step_samples = True, 0
        last = micro == self.train_cfg.accumulate - 1
        if is_empty(batch):
            self._take_part(last)
            if last:
                self._finish_step(step)
            return None
        self._step_samples += len(batch["slot"])
        # every draw is made for the G slots of the global micro-batch and each sample takes its slot's row:
        # the same on any number of ranks, and whichever samples data.on_bad_image: skip dropped
        g_size, slots = self._global_size(), batch["slot"]
        gen = generator_for(self.seed, "train", position)
        z0 = self.latents(batch, gen, g_size)
        # t stays on the CPU: the schedule is indexed there and the quartiles logged from it without a
        # host sync; the UNet copies it to the device itself
        t = sample_timesteps(g_size, len(self.schedule), gen)[slots]
        noise = self._rows(torch.randn((g_size, *z0.shape[1:]), generator=gen), slots).to(z0.dtype)
        cond, cond_map = self.guidance(batch["id"], batch["flipped"], tuple(z0.shape[-2:]))
        if cond is not None or cond_map is not None:
            keep = self._rows(dropout_keep_mask(g_size, self.drop_prob, gen), slots)
            cond, cond_map = apply_keep_mask(self._to_device(cond), self._to_device(cond_map), keep)
        # model.unet.dropout draws from the global RNG: seeded per position and rank, so a resume is exact
        draws = seeded_global_rng(self.device, self.seed, "unet-dropout", position, self._rank()) \
            if self._draws_global_rng else contextlib.nullcontext()
        with draws:
            per_sample = diffusion_loss(lambda x, tt: self.unet(x, tt, cond, cond_map), z0, t, noise, self.schedule,
                                        self.diffusion_cfg)
        loss = per_sample.mean()
        # every readable sample weighs 1 / batch_size, however many its micro-batch or rank lost to
        # data.on_bad_image: skip (a mean over the readable ones would weigh a rank's or micro-batch's
        # survivors up, so DDP would differ from one device); DDP averages the ranks' gradients
        objective = per_sample.sum() / (g_size // self._world() * self.train_cfg.accumulate)
        # a device tensor, read once per optimiser step (in _finish_step), not once per micro-batch
        self._step_finite = torch.isfinite(loss.detach()) & self._step_finite
        # DDP all-reduces the gradients once per optimiser step: the micro-batches before the last
        # accumulate locally (no_sync), the last one's backward reduces the sum
        with contextlib.nullcontext() if last else self._no_gradient_sync():
            self.manual_backward(objective)
        self._log_loss(loss.detach(), per_sample.detach(), t, step, micro)
        if last:
            self._finish_step(step)
        return loss.detach()

    def _take_part(self, last: bool) -> None:
        """A micro-batch slice without a readable sample (data.on_bad_image: skip) adds nothing, as its
        samples weigh nothing; its backward still runs, a zero gradient for every parameter, so that the
        step's DDP all-reduce (every parameter's hook) happens on every rank."""
        zero = sum(p.sum() for p in self.unet.parameters()) * 0.0
        with contextlib.nullcontext() if last else self._no_gradient_sync():
            self.manual_backward(zero)

    def _no_gradient_sync(self):
        """DDP's no_sync for a backward pass (Lightning's parallel strategies); nothing otherwise."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else contextlib.nullcontext()

    def _to_device(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else _to_device(x, self.device)

    def _scaler(self):
        """The fp16 GradScaler of the precision plugin, None under 32 and bf16."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def _verdict(self) -> tuple[bool, bool, int]:
        """(every micro-batch's loss finite, all gradients finite) on every rank, and the step's readable
        samples on all ranks: the step's one host sync."""
        grads = all_finite([p.grad for p in self.unet.parameters() if p.grad is not None])
        flags = torch.stack([torch.as_tensor(v, device=self.device).int()
                             for v in (self._step_finite, grads, self._step_samples)])
        world = self._world()
        if world > 1:  # one all-reduce for all three: how many ranks found each finite, how many samples
            flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
        finite, grads_finite, samples = flags.tolist()
        return finite == world, grads_finite == world, samples

    def _finish_step(self, step: int) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        loss_finite, grads_finite, samples = self._verdict()
        if not samples:  # every rank knows it from the all-reduce: all stop here, none waits for the others
            raise no_readable_image(step, self.train_cfg.accumulate)
        if loss_finite and grads_finite:
            opt.step()  # clips in on_before_optimizer_step
            decay = ema_decay(self.ema_updates, self.train_cfg.ema_decay, self.train_cfg.ema_warmup)
            update_ema(self.ema, self.unet, decay)
            self.ema_updates += 1
            self.consecutive_nan = 0
            self._log_host("train/ema_decay", decay, rank_zero_only=True)
        elif loss_finite and self._scaler() is not None:
            # fp16 gradients overflowed at this loss scale: the GradScaler's routine, not a fault. Its
            # step skips the update and lowers the scale; the weights, optimiser state and EMA stay
            # (the scaler finds the same non-finite loss-scaled gradients as all_finite)
            opt.step()
        else:
            self._skip(step)
        opt.zero_grad(set_to_none=True)
        sched.step()
        self.step = step + 1
        self._log_step(sched)
        self._stop_when_done()

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this inside opt.step(), after an fp16 GradScaler has unscaled the gradients:
        # clipping before opt.step() would clip the loss-scaled gradients (an effective clip of
        # grad_clip / scale, e.g. 1 / 65536).
        if self.train_cfg.grad_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.train_cfg.grad_clip, gradient_clip_algorithm="norm")

    def _stop_when_done(self) -> None:
        # Lightning's max_steps counts only optimiser steps taken; ours also counts skipped ones.
        if self.step >= self.train_cfg.max_steps:
            self.trainer.should_stop = True

    def on_train_start(self) -> None:
        self._stop_when_done()

    def _skip(self, step: int) -> None:
        self.nan_skips += 1
        self.consecutive_nan += 1
        if self.train_cfg.on_nan == "raise":
            raise NonFiniteLossError(f"non-finite loss or gradient at step {step} (train.on_nan: raise)")
        if self.consecutive_nan >= self.train_cfg.max_consecutive_nan:
            raise NonFiniteLossError(f"{self.consecutive_nan} consecutive steps with a non-finite loss or gradient "
                                     f"(last: step {step}); aborting (train.max_consecutive_nan="
                                     f"{self.train_cfg.max_consecutive_nan})")
        if self.trainer.is_global_zero:
            print(f"sgdm: step {step}: non-finite loss or gradient, step skipped "
                  f"({self.consecutive_nan} in a row, {self.nan_skips} in total)", flush=True)

    # -- logging ----------------------------------------------------------------------------------------------
    def _log_loss(self, loss: torch.Tensor, per_sample: torch.Tensor, t: torch.Tensor, step: int, micro: int) -> None:
        """t: the micro-batch's timesteps on the CPU, so which quartiles it holds is known without a sync.

        The progress bar shows ``loss``, a host copy of train/loss read on the last micro-batch of every
        ``train.log_every``-th step: Lightning turns each prog_bar metric into a number after every batch
        (its logger connector's on_batch_end, bar or no bar), a host sync per micro-batch for a device
        tensor such as train/loss itself.
        """
        self.log("train/loss", loss, on_step=True)
        self._log_bar_loss(loss, step, micro == self.train_cfg.accumulate - 1, self.train_cfg.log_every)
        quartile = (t.cpu() * 4) // len(self.schedule)
        for q in range(4):
            rows = (quartile == q).nonzero().flatten()
            if len(rows):
                # per_sample[rows] is per_sample[mask] (the same rows in the same order)
                self.log(f"train/loss_q{q}", per_sample[_to_device(rows, per_sample.device)].mean(), on_step=True)

    def _log_step(self, sched) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            dt = now - self._last_step_time
            self._log_host("train/steps_per_sec", 1.0 / dt, rank_zero_only=True)
            self._log_host("train/images_per_sec", self.train_cfg.batch_size / dt, prog_bar=True,
                           rank_zero_only=True)
        self._last_step_time = now
        self._log_host("train/lr", sched.get_last_lr()[0], rank_zero_only=True)
        self._log_host("train/skipped_steps", float(self.nan_skips), rank_zero_only=True)
        self._log_host("train/step", float(self.step), rank_zero_only=True)






def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x.to(device)``; from the CPU without waiting for the device's queued work (a copy from pageable
    memory is staged before the call returns, so the source may be freed or reused at once)."""
    return x.to(device, non_blocking=x.device.type == "cpu")


def all_finite(tensors: list[torch.Tensor]) -> Union[bool, torch.Tensor]:
    """Whether every element of ``tensors`` is finite, as a 0-d bool tensor (True for no tensors),
    without a host sync: one fused check per (device, dtype) on CPU and CUDA (GradScaler's, with an
    unscale by 1, which leaves every value as it is), a reduction per tensor elsewhere."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for x in tensors:
        groups.setdefault((x.device, x.dtype), []).append(x)
    verdicts = []
    for (device, _), xs in groups.items():
        if device.type in ("cpu", "cuda"):
            found = torch.zeros((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(xs, found, torch.ones((), dtype=torch.float32,
                                                                                    device=device))
            verdicts.append(found == 0)
        else:
            verdicts.append(torch.stack([torch.isfinite(x).all() for x in xs]).all())
    if not verdicts:
        return True
    if len(verdicts) == 1:
        return verdicts[0]
    return torch.stack([v.to(verdicts[0].device) for v in verdicts]).all()
