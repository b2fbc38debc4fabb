"""The latent scale factor (LDM Sec. 4.3.2 / Appendix G): scale = 1 / std(z) of the encoded training data.

Computed once, at the start of a new run whose first stage has none (neither
``model.autoencoder.scale_factor`` nor one stored with its weights), from
posterior samples of the first ``train.batch_size`` training images (dataset
order, unflipped, noise from (run.seed, "scale")). It lives in the first
stage's ``scale_factor`` buffer, hence in every checkpoint and the export.
"""
from __future__ import annotations

import torch

from sgdm.training.rng import generator_for

__all__ = ["ensure_scale_factor"]


@torch.no_grad()
def ensure_scale_factor(cfg, module) -> None:
    first_stage = module.first_stage
    if first_stage.has_scale_factor:
        return
    gen = generator_for(cfg.run.seed, "scale")
    n = cfg.train.batch_size
    if cfg.train.cache_latents:
        from sgdm.training.latent_cache import LatentCacheDataset, cache_dir_for

        cache = LatentCacheDataset(cache_dir_for(cfg))
        rows = [r for r in (cache[i] for i in range(min(len(cache), n))) if r is not None]  # unreadable: dropped, as below
        mean = torch.stack([r["mean"] for r in rows]).double()
        std = torch.exp(0.5 * torch.stack([r["logvar"] for r in rows]).double())
        z = mean + std * torch.randn(mean.shape, generator=gen, dtype=torch.float64)
        first_stage.scale_factor.fill_(1.0 / float(z.flatten().std()))
        return
    from sgdm.models.autoencoder import compute_scale_factor
    from sgdm.training.data import build_image_dataset

    dataset = build_image_dataset(cfg.data, cfg.run.seed)
    samples = [dataset[i] for i in range(min(len(dataset), n))]
    images = torch.stack([s["image"] for s in samples if s is not None])
    device = next(first_stage.parameters()).device
    compute_scale_factor(first_stage, [images.to(device)], generator=gen)
