"""Sample grids during training, from fixed CPU-seeded noise with the EMA weights.

Rows: for label guidance one row per cluster (the first ``train.sample_max_clusters``)
at ``sampler.guidance_scale``; then one row per scale w in ``train.sample_scales``
(Eq. 4), whose columns take the guidance of the first annotated images (clusters
0, 1, ... for label guidance; a box store's rows without annotation are skipped). Every row starts from the same
``train.sample_per_row`` noise tensors, drawn on the CPU from (run.seed, "grid"),
so grids are comparable across steps and machines. DDIM, ``train.sample_steps``.
"""
from __future__ import annotations

import pathlib
from typing import Optional

import pytorch_lightning as pl
import torch

from sgdm.atomic import atomic_open
from sgdm.diffusion.guidance import ClassifierFreeGuidance
from sgdm.diffusion.samplers import ddim_timesteps, sample_ddim
from sgdm.diffusion.schedule import eps_from_output
from sgdm.models.conditioning import one_hot
from sgdm.training.rng import generator_for

__all__ = ["SampleGrid", "grid_conditions", "sample_rows", "save_grid"]


def grid_conditions(lookup, kind: str, k: int, n: int, size: tuple[int, int]):
    """(cond, cond_map) for n columns: clusters 0..n-1 (mod K) for labels, else the first n stored annotations."""
    if kind == "none":
        return None, None
    if kind == "label":
        return one_hot([i % k for i in range(n)], k), None
    store = lookup.store()
    annotated = store.annotated()  # a box store's rows with the no-annotation marker guide nothing
    ids = [image_id for image_id, a in zip(store.ids, annotated.tolist()) if a][:n]
    if not ids:
        raise ValueError(f"annotation store {store.path}: no image is annotated, there is no guidance to sample with")
    ids = [ids[i % len(ids)] for i in range(n)]
    return lookup(ids, torch.zeros(n, dtype=torch.bool), size)


@torch.no_grad()
def sample_rows(module, rows: list[tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]], noise: torch.Tensor,
                steps: int, parameterization: str) -> torch.Tensor:
    """Decoded images [rows * n, 3, H, W] in [-1, 1], each row from the same ``noise``."""
    unet, schedule = module.ema, module.schedule
    device = module.device

    def eps_model(x, t, cond, cond_map):
        return eps_from_output(schedule, x, t, unet(x, t, cond, cond_map), parameterization)

    timesteps = ddim_timesteps(steps, len(schedule))
    images = []
    for cond, cond_map, scale in rows:
        move = (lambda c: None if c is None else c.to(device))
        denoise = ClassifierFreeGuidance(eps_model, move(cond), move(cond_map), scale)
        z = sample_ddim(denoise, noise.to(device), timesteps, schedule)
        images.append(module.first_stage.decode(z / module.first_stage.scale_factor).clamp(-1, 1).cpu())
    return torch.cat(images)


def save_grid(images: torch.Tensor, per_row: int, path: pathlib.Path) -> torch.Tensor:
    """Tile [N, 3, H, W] in [-1, 1] into a uint8 [3, rows*H, per_row*W] grid and save it as PNG, atomically: a
    resume does not draw a step's grid again, so a grid cut short (SIGKILL, a full disk) would stay."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = (n + per_row - 1) // per_row
    grid = torch.zeros(c, rows * h, per_row * w)
    for i, img in enumerate(images):
        r, col = divmod(i, per_row)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    grid = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    with atomic_open(path, "wb") as fh:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(fh, format="PNG")
    return grid


class SampleGrid(pl.Callback):
    """Every ``train.sample_every`` optimiser steps (rank 0): a grid PNG in ``directory`` and to the logger."""

    def __init__(self, cfg, directory: pathlib.Path):
        self.cfg, self.directory = cfg, pathlib.Path(directory)

    def rows(self, module, size):
        g, t = self.cfg.model.guidance, self.cfg.train
        n = t.sample_per_row
        if g.kind == "none":
            return [(None, None, 1.0)]
        rows = []
        if g.kind == "label":
            for c in range(min(g.num_classes, t.sample_max_clusters)):
                rows.append((one_hot([c] * n, g.num_classes), None, self.cfg.sampler.guidance_scale))
        cond, cond_map = grid_conditions(module.guidance, g.kind, g.num_classes, n, size)
        rows.extend((cond, cond_map, float(w)) for w in t.sample_scales)
        return rows

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        at_boundary = pl_module.next_position == int(batch["position"][0]) + 1
        if at_boundary and not pl_module.step % self.cfg.train.sample_every and trainer.is_global_zero:
            self.draw(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        """A resume draws the grid of the step it starts at if that grid is missing: the checkpoint of a step
        is written before its grid, so a run stopped while drawing (SIGKILL, a full disk) had none, and the
        restored EMA weights are those it would have been drawn from."""
        step = pl_module.step
        if step and not step % self.cfg.train.sample_every and trainer.is_global_zero \
                and not self.path(step).is_file():
            self.draw(trainer, pl_module)

    def path(self, step: int) -> pathlib.Path:
        return self.directory / f"step-{step:08d}.png"

    def draw(self, trainer, pl_module) -> None:
        ucfg = self.cfg.model.unet
        size = (ucfg.image_size, ucfg.image_size)
        noise = torch.randn((self.cfg.train.sample_per_row, ucfg.in_channels, *size),
                            generator=generator_for(self.cfg.run.seed, "grid"))
        images = sample_rows(pl_module, self.rows(pl_module, size), noise, self.cfg.train.sample_steps,
                             self.cfg.diffusion.parameterization)
        grid = save_grid(images, self.cfg.train.sample_per_row, self.path(pl_module.step))
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples", grid, global_step=pl_module.step)
