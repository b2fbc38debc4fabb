"""The latent scale factor (LDM Sec. 4.3.2 / Appendix G): scale = 1 / std(z) of the encoded training data.

Computed once, at the start of a new run whose first stage has none (neither
``model.autoencoder.scale_factor`` nor one stored with its weights), from
posterior samples of the first ``train.batch_size`` training images (dataset
order, unflipped; unreadable ones left out): z = mean + exp(logvar / 2) * n in
float64, n ~ N(0, I) from (run.seed, "scale"). The posteriors come from the
latent cache with ``train.cache_latents``, else from encoding the images in
batches of at most ``batch_size`` (as the cache does), so both give the same
factor (up to float rounding). It lives in the first stage's ``scale_factor`` buffer, hence in every
checkpoint and the export.
"""
from __future__ import annotations

import math
import os

import torch

from sgdm.training.rng import generator_for

__all__ = ["ensure_scale_factor"]


@torch.no_grad()
def _posteriors(cfg, first_stage, n: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) float32 [m, C, h, w] of the readable images among the first ``n``."""
    if cfg.train.cache_latents:
        from sgdm.training.latent_cache import LatentCacheDataset, cache_dir_for

        cache = LatentCacheDataset(cache_dir_for(cfg))
        rows = [r for r in (cache[i] for i in range(min(len(cache), n))) if r is not None]
        if not rows:
            return torch.zeros(0), torch.zeros(0)
        return torch.stack([r["mean"] for r in rows]), torch.stack([r["logvar"] for r in rows])
    from sgdm.training.data import build_image_dataset

    dataset = build_image_dataset(cfg.data, cfg.run.seed)
    device = next(first_stage.parameters()).device
    means, logvars = [], []
    n = min(len(dataset), n)
    for start in range(0, n, batch_size):  # bounded memory: 256 px images take ~180 MB each in the encoder
        images = [s["image"] for s in (dataset[i] for i in range(start, min(n, start + batch_size))) if s is not None]
        if images:
            posterior = first_stage.encode(torch.stack(images).to(device))
            means.append(posterior.mean.float().cpu())
            logvars.append(posterior.logvar.float().cpu())
    if not means:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(means), torch.cat(logvars)


@torch.no_grad()
def ensure_scale_factor(cfg, module, batch_size: int = 32) -> None:
    """Set ``module.first_stage.scale_factor`` (in place) as the module docstring describes, unless it is
    set already. ``cfg``: the experiment config; ``batch_size``: images per encoder call. No readable
    image among the first ``train.batch_size``, or latents with no spread, is a ValueError; rank 0
    prints the factor."""
    first_stage = module.first_stage
    if first_stage.has_scale_factor:
        return
    mean, logvar = _posteriors(cfg, first_stage, cfg.train.batch_size, batch_size)
    if len(mean) == 0:
        raise ValueError(f"data: none of the first {cfg.train.batch_size} training images is readable; cannot "
                         f"compute the latent scale factor (or set model.autoencoder.scale_factor)")
    noise = torch.randn(mean.shape, generator=generator_for(cfg.run.seed, "scale"), dtype=torch.float64)
    z = mean.double() + torch.exp(0.5 * logvar.double()) * noise
    std = float(z.flatten().std())
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"the first stage's latents of the first {len(mean)} training images have std {std}; "
                         f"cannot compute the latent scale factor (set model.autoencoder.scale_factor)")
    first_stage.scale_factor.fill_(1.0 / std)
    if int(os.environ.get("RANK", "0")) == 0:  # every rank computes the same factor; one line says it
        # said, because a fixed model.autoencoder.scale_factor reproduces it (LDM's Churches value is 0.22765929)
        print(f"sgdm: model.autoencoder.scale_factor = 1/std of the latents of the first {len(mean)} training "
              f"images = {1.0 / std:.8g} (kept with the weights in every checkpoint)", flush=True)
