"""STEGO-style self-segmentation (Hamilton et al., ICLR 2022): the self-segmented f (paper Sec. 3.2).

A small segmentation head ``S`` maps frozen patch features ``f [B, D, h, w]``
to codes ``c [B, C, h, w]``. It is trained with STEGO's feature-correspondence
distillation: for two feature maps with cosine-similarity tensor
``F_hwij = <f1_hw, f2_ij> / (|f1_hw| |f2_ij|)`` and the same for the codes,
``S_hwij``, the loss term is (STEGO Eq. 3/4)

    L_corr(x, y, b) = - mean_hwij (F_hwij - b) * max(S_hwij, 0)

(with ``pointwise`` centring, ``F`` minus its mean over ``ij`` plus its global
mean, as STEGO's released configuration). The total (Eq. 5) sums the image
with itself (``pos_intra``), with one of its k nearest neighbours by CLS
feature (``pos_inter``) and with a random image (``neg_inter``), each with its
weight and shift ``b``. The cluster probe is k-means (squared Euclidean
distance, centroids not renormalised) on the L2-normalised codes into K
classes. STEGO's probe is spherical k-means learnt by SGD (cosine to unit
centroids); the two assign a patch differently where cluster spreads differ (a
centroid's length shrinks with its cluster's spread): 7-11% of points on
synthetic unit vectors with unequal spreads, with NMI/ARI no worse here.

Scale: training and the probe read patch features a batch at a time (from a
tensor or :class:`~sgdm.annotation.patches.ShardPatches`, memory-mapped shard
files), and under ``torch.distributed`` the head trains data-parallel.

The fitted f -- head and centroids -- is a :class:`Segmenter`; ``annotate``
saves it with the store, so layout adherence segments generated images with
the same f that made the guiding masks.

Mask resolution: as STEGO, the codes are upsampled bilinearly from the patch
grid to ``mask_size`` before each cell takes its nearest centroid (the probe is
fitted at the patch grid); a ``mask_size`` no finer than the grid (0) keeps it.

Dense CRF (opt-in, ``StegoConfig.crf``): as STEGO's evaluation, the probe's class
probabilities at the mask grid are refined by a fully connected CRF on the image
the patches came from (:mod:`sgdm.annotation.crf`); the segmenter keeps the
settings, so adherence segments samples with the same f.

``method: kmeans`` is the non-parametric baseline (k-means directly on the patch features).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sgdm.annotation.config import CRFConfig
from sgdm.annotation.crf import dense_crf, scaled
from sgdm.annotation.kmeans import assign, kmeans_from_config
from sgdm.annotation.ranks import Failures
from sgdm.annotation.resume import HeadCheckpoint, MaskChunks, from_rank0, tensor_digest

__all__ = [
    "SegmentationHead",
    "correlation",
    "correspondence_loss",
    "stego_loss",
    "knn_partners",
    "train_head",
    "Segmenter",
    "fit_segmenter",
    "segment",
    "upsample_codes",
]


class SegmentationHead(nn.Module):
    """Codes ``[B, dim, h, w]`` = linear(f) + MLP(f) of patch features ``f [B, D, h, w]`` (1x1 convs)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Conv2d(in_dim, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(feats) + self.nonlinear(feats)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[B, H, W, I, J]`` between ``a [B, C, H, W]`` and ``b [B, C, I, J]``."""
    return torch.einsum("bchw,bcij->bhwij", F.normalize(a, dim=1), F.normalize(b, dim=1))


def correspondence_loss(f1, f2, c1, c2, shift: float, pointwise: bool = True) -> torch.Tensor:
    """``L_corr``: ``-mean((F - shift) * max(S, 0))`` for features ``f*`` and codes ``c*`` (``[B, C, h, w]``)."""
    fd = correlation(f1, f2)
    if pointwise:
        fd = fd - fd.mean((3, 4), keepdim=True) + fd.mean()
    cd = correlation(c1, c2)
    return -(cd.clamp_min(0) * (fd - shift)).mean()


def _sample(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return t[:, :, rows][:, :, :, cols]


def stego_loss(feats, knn_feats, rand_feats, head: nn.Module, cfg, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """STEGO Eq. 5 on a batch of feature maps ``[B, D, h, w]`` and its kNN / random partners."""
    h, w = feats.shape[-2:]
    n = cfg.feature_samples

    def pick(x):
        if n <= 0:
            return x
        rows = torch.randint(h, (n,), generator=generator).to(x.device)
        cols = torch.randint(w, (n,), generator=generator).to(x.device)
        return _sample(x, rows, cols)

    f, fk, fr = pick(feats), pick(knn_feats), pick(rand_feats)
    c, ck, cr = head(f), head(fk), head(fr)
    parts = {
        "pos_intra": correspondence_loss(f, f, c, c, cfg.pos_intra_shift, cfg.pointwise),
        "pos_inter": correspondence_loss(f, fk, c, ck, cfg.pos_inter_shift, cfg.pointwise),
        "neg_inter": correspondence_loss(f, fr, c, cr, cfg.neg_inter_shift, cfg.pointwise),
    }
    total = (
        cfg.pos_intra_weight * parts["pos_intra"]
        + cfg.pos_inter_weight * parts["pos_inter"]
        + cfg.neg_inter_weight * parts["neg_inter"]
    )
    return total, {k: float(v.detach()) for k, v in parts.items()}


def knn_partners(cls: torch.Tensor, k: int, device="cpu", block_elements: int = 1 << 25,
                 distributed: bool = False) -> torch.Tensor:
    """Indices ``[N, k']`` (on the CPU) of each image's nearest neighbours by cosine similarity,
    itself excluded. Computed on ``device`` in row blocks of at most ``block_elements``
    similarities (128 MB), so the N x N matrix never exists (118k COCO images: 56 GB).
    ``distributed``: every rank holds all of ``cls``, computes a contiguous share of the rows and
    gets everyone's (one all-gather), instead of each rank computing all N rows."""
    rank, world = _rank_world(distributed)
    x = F.normalize(cls.float(), dim=1).to(device)
    n = x.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return torch.arange(n).unsqueeze(1)  # a single image is its own partner
    share = -(-n // world)
    lo, hi = min(n, rank * share), min(n, (rank + 1) * share)
    rows = max(1, block_elements // n)
    out = [torch.zeros(0, k, dtype=torch.long, device=device)]
    failures = Failures("finding the STEGO head's kNN partners", device, distributed)
    with failures.held():  # a rank that fails here (out of memory) stops the others at settle, not the all-gather
        for start in range(lo, hi, rows):
            sim = x[start : min(hi, start + rows)] @ x.t()
            diagonal = torch.arange(sim.shape[0], device=sim.device)
            sim[diagonal, diagonal + start] = -float("inf")
            out.append(sim.topk(k, dim=1).indices)
    failures.settle()
    mine = torch.cat(out)
    if world > 1:
        import torch.distributed as dist

        padded = torch.zeros(share, k, dtype=torch.long, device=device)  # all-gather needs equal shapes
        padded[: mine.shape[0]] = mine
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        mine = torch.cat([p[: max(0, min(n, (r + 1) * share) - r * share)] for r, p in enumerate(parts)])
    return mine.cpu()


def _rank_world(distributed: bool) -> tuple[int, int]:
    import torch.distributed as dist

    if distributed and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(module: nn.Module, world: int, failures: Failures) -> None:
    """Data parallelism: every rank's gradient becomes the mean over ranks (one all-reduce). With
    equal per-rank batches this is the gradient of the loss on the union of the batches.

    Each rank's failure flag (``failures``: whether its step raised) travels in the same all-reduce, so a
    rank whose step failed (it sends zeros) stops every rank at this step (:meth:`Failures.raise_if`)."""
    import torch.distributed as dist

    params = list(module.parameters())
    failed = failures.error is not None
    sent = [torch.zeros_like(p) if failed or p.grad is None else p.grad for p in params]
    flat = torch.cat([g.flatten() for g in sent] + [failures.flag().to(sent[0].dtype)])
    dist.all_reduce(flat)
    failures.raise_if(flat[-1:])
    flat /= world
    offset = 0
    for p in params:
        if p.grad is not None:  # a parameter without a gradient stays without one
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def train_head(patches, cls: torch.Tensor, cfg, generator: torch.Generator, device="cpu",
               log=None, distributed: bool = False, checkpoint: Optional[HeadCheckpoint] = None) -> SegmentationHead:
    """Train a :class:`SegmentationHead` on frozen ``patches [N, h, w, D]`` (any float dtype; a
    tensor or a :class:`~sgdm.annotation.patches.ShardPatches`, read one batch at a time).

    ``distributed`` (inside ``torch.distributed``): data-parallel. Every rank holds the same
    ``cls`` and can read every image; each epoch's permutation (from ``generator``, identical
    on all ranks) is dealt out round-robin, padded so every rank takes the same number of steps
    of ``cfg.batch_size`` images, and gradients are averaged across ranks before each step, so
    the heads stay identical. Partner and spatial draws come from a per-rank generator. A rank
    whose step fails (its error, or a checkpoint that cannot be written) stops every rank at that
    step: the others raise :class:`~sgdm.annotation.ranks.RankFailed` naming it and its error
    (:mod:`sgdm.annotation.ranks`), instead of waiting for it until the collective's timeout.

    ``checkpoint``: the state is saved there every ``checkpoint.every`` steps and after the last
    (by rank 0, with every rank's generator), and training continues from a saved state made from
    the same inputs (``cls``, ``generator``'s state on entry, the settings but ``epochs``, the
    number of ranks, and the checkpoint's own identity for the patch features); ``generator`` ends
    where an uninterrupted run leaves it. See :mod:`sgdm.annotation.resume`.
    """
    n = len(patches)
    rank, world = _rank_world(distributed)
    from sgdm.training.rng import seeded_cpu_rng

    key = _head_key(patches, cls, cfg, generator, world) if checkpoint is not None else None
    # parameter init from our generator, not the global one
    with seeded_cpu_rng(int(torch.randint(2**62, (1,), generator=generator))):
        head = SegmentationHead(patches.shape[-1], cfg.dim).to(device)
    local = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)) + rank)
    optimiser = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    partners = knn_partners(cls, cfg.knn, device, distributed=distributed)
    per_rank = -(-n // world)
    steps = -(-per_rank // cfg.batch_size)  # per epoch
    total = cfg.epochs * steps
    step = 0
    failures = Failures("training the STEGO head", device, distributed)
    if checkpoint is not None:
        saved = from_rank0(lambda: checkpoint.load(key, total), rank, world, "reading the STEGO head checkpoint")
        if saved is not None:
            step = saved[0]
            try:
                _restore(saved[1], head, optimiser, generator, local, rank)
            except (KeyError, RuntimeError, ValueError) as err:  # its identity matched: written by another sgdm?
                raise ValueError(f"STEGO head checkpoint {saved[2]} does not fit this head ({err}); delete "
                                 f"it to train the head from the start") from None

    def maps(idx):
        return patches[idx].to(device).float().permute(0, 3, 1, 2)

    for epoch in range(step // steps if steps else cfg.epochs, cfg.epochs):
        epoch_start = generator.get_state()  # a checkpoint inside this epoch draws its permutation again
        order = torch.randperm(n, generator=generator)
        mine = order.repeat(-(-per_rank * world // n))[: per_rank * world][rank::world]
        for start in range((step - epoch * steps) * cfg.batch_size, per_rank, cfg.batch_size):
            with failures.held():  # this rank's step: an error is raised on every rank at the all-reduce
                idx = mine[start : start + cfg.batch_size]
                pick = torch.randint(partners.shape[1], (idx.numel(),), generator=local)
                knn = partners[idx, pick]
                rand = torch.randint(n, (idx.numel(),), generator=local)
                loss, parts = stego_loss(maps(idx), maps(knn), maps(rand), head, cfg, local)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
            if failures.active:
                _average_gradients(head, world, failures)
            optimiser.step()
            step += 1
            if checkpoint is not None and (step % checkpoint.every == 0 or step == total):
                # at an epoch's end the generator has nothing left to draw in it: its state starts the next
                _save_state(checkpoint, key, step, total, head, optimiser,
                            epoch_start if step % steps else generator.get_state(), local, rank, world, failures)
        if log is not None and rank == 0:
            terms = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
            log(f"stego epoch {epoch + 1}/{cfg.epochs}: loss {float(loss.detach()):.4f} {terms}")
    return head.eval()


# settings that do not change the head's training (epochs only decides where it stops: a longer run
# continues a shorter one's checkpoint)
_NOT_IN_TRAINING = ("epochs", "method", "mask_size", "crf")


def _head_key(patches, cls: torch.Tensor, cfg, generator: torch.Generator, world: int) -> dict:
    """What a head checkpoint must have been made from, besides the checkpoint's own identity."""
    from sgdm.config.core import to_dict

    return {"stego": {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IN_TRAINING},
            "patch_shape": [len(patches), *patches.shape[1:]], "cls": tensor_digest(cls),
            "generator": tensor_digest(generator.get_state()), "world_size": world}


def _save_state(checkpoint: HeadCheckpoint, key, step: int, total: int, head, optimiser, generator_state, local,
                rank, world, failures: Failures):
    """Every rank's partner generator to rank 0, which writes the checkpoint; a write that fails (a full
    disk) stops every rank here."""
    states = [local.get_state()]
    if world > 1:
        import torch.distributed as dist

        device = next(head.parameters()).device  # where the process group's collectives run (the gradients')
        states = [torch.empty_like(states[0], device=device) for _ in range(world)]
        dist.all_gather(states, local.get_state().to(device))
    with failures.held():
        if rank == 0:
            tensors = {f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()}
            for index, state in optimiser.state_dict()["state"].items():
                tensors.update({f"adam.{index}.{k}": v.detach().cpu() for k, v in state.items()})
            tensors["generator"] = generator_state
            tensors.update({f"local.{r}": s.cpu() for r, s in enumerate(states)})
            checkpoint.save(key, step, tensors, total)
    failures.settle()


def _restore(tensors: dict, head, optimiser, generator: torch.Generator, local: torch.Generator, rank: int) -> None:
    device = next(head.parameters()).device
    head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("adam."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value if key == "step" else value.to(device)
    optimiser.load_state_dict({"state": state, "param_groups": optimiser.state_dict()["param_groups"]})
    generator.set_state(tensors["generator"])
    local.set_state(tensors[f"local.{rank}"])


def _probe_sample(patches, encode, fit_n: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``fit_n`` random patch codes ``[M, C]`` for fitting the cluster probe: every patch when
    there are few, else all patches of ``4 * fit_n / (h w)`` random images, subsampled."""
    n, h, w = len(patches), patches.shape[1], patches.shape[2]
    images = torch.arange(n)
    if n * h * w > fit_n:
        images = torch.randperm(n, generator=generator)[: min(n, 4 * -(-fit_n // (h * w)))].sort().values
    codes = torch.cat([encode(patches[images[s : s + batch]]).reshape(-1, encode.dim).cpu()
                       for s in range(0, images.numel(), batch)])
    if codes.shape[0] > fit_n:
        codes = codes[torch.randperm(codes.shape[0], generator=generator)[:fit_n]]
    return codes


class _Encoder:
    """Normalised codes ``[B, h, w, C]`` of patch features ``[B, h, w, D]``: the head's, or the
    features themselves (``head=None``, the patch k-means baseline)."""

    def __init__(self, head, dim: int, device):
        self.head, self.dim, self.device = head, dim, device

    @torch.no_grad()
    def raw(self, feats: torch.Tensor) -> torch.Tensor:
        """Unnormalised codes ``[B, C, h, w]`` of ``feats [B, h, w, D]``."""
        x = feats.to(self.device).float().permute(0, 3, 1, 2)
        return x if self.head is None else self.head(x)

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.raw(feats), dim=1).permute(0, 2, 3, 1)


def upsample_codes(codes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Codes ``[B, C, h, w]`` -> normalised ``[B, H, W, C]`` for ``size = (H, W)``: bilinear
    (half-pixel centres, ``align_corners=False``) before the normalisation, as STEGO upsamples its
    codes to the label size before its cluster probe normalises them."""
    if tuple(codes.shape[-2:]) != tuple(size):
        codes = F.interpolate(codes, size=tuple(size), mode="bilinear", align_corners=False)
    return F.normalize(codes, dim=1).permute(0, 2, 3, 1)


class Segmenter:
    """The fitted self-segmentation f: an optional STEGO head, the K cluster centroids of its
    normalised codes (of the normalised patch features for ``method: kmeans``), the side
    ``mask_size`` of the class maps it draws (the patch grid where that is as fine, 0 included;
    see ``StegoConfig.mask_size``) and ``crf``, its dense-CRF refinement
    (:class:`~sgdm.annotation.config.CRFConfig`; None, or one not enabled, is off)."""

    def __init__(self, centroids: torch.Tensor, head: Optional[SegmentationHead] = None, mask_size: int = 0,
                 crf: Optional[CRFConfig] = None):
        if centroids.dim() != 2:
            raise ValueError(f"Segmenter: centroids must be [K, C], got shape {tuple(centroids.shape)}")
        if mask_size < 0:
            raise ValueError(f"Segmenter: mask_size must be >= 0 (0: the patch grid), got {mask_size}")
        self.centroids, self.head, self.mask_size = centroids.float().cpu(), head, int(mask_size)
        self.crf = crf if crf is not None and crf.enabled else None

    num_classes = property(lambda self: self.centroids.shape[0])

    def encoder(self, device="cpu") -> "_Encoder":
        head = None if self.head is None else self.head.to(device).eval()
        return _Encoder(head, self.centroids.shape[1], device)

    def mask_hw(self, grid: Sequence[int]) -> tuple[int, int]:
        """``(h, w)`` of the class maps drawn from patch features on a ``grid`` (h, w) patch grid:
        ``mask_size`` square, or the grid itself where that is as fine (``mask_size`` 0 included)."""
        h, w = int(grid[0]), int(grid[1])
        return (self.mask_size, self.mask_size) if self.mask_size > max(h, w) else (h, w)

    @torch.no_grad()
    def assign(self, patches, batch_size: int = 64, chunk_elements: int = 1 << 24, device="cpu",
               images=None, progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """Class maps ``[N, s, s]`` uint8 (``s = mask_size``; ``[N, h, w]`` where the grid is as fine) of
        patch features ``[N, h, w, D]``: codes upsampled (:func:`upsample_codes`), then the nearest
        centroid of each cell, or with ``crf`` the dense-CRF refinement (:meth:`refine`).

        ``images``: required with ``crf`` (ignored without), the ``N`` images the patches came from,
        ``[N, 3, H, W]`` in [-1, 1] as :func:`~sgdm.annotation.features.extract` took them: a tensor,
        or any source whose slices are such tensors (read one step of images at a time).
        ``progress(done, N)``, if given, is called after each step with the images assigned so far."""
        n, h, w = len(patches), patches.shape[1], patches.shape[2]
        if self.head is None and patches.shape[-1] != self.centroids.shape[1]:
            raise ValueError(f"Segmenter: patch features have D={patches.shape[-1]}, the centroids "
                             f"{self.centroids.shape[1]} (features of another backbone?)")
        if self.crf is not None and images is None:
            raise ValueError("Segmenter.assign: images is required: this segmenter refines its class maps with a "
                             "dense CRF (crf enabled), which needs the images the patches came from, [N, 3, H, W] "
                             "in [-1, 1]")
        if self.crf is not None and len(images) != n:
            raise ValueError(f"Segmenter.assign: images holds {len(images)} images for {n} patch maps")
        out_h, out_w = self.mask_hw((h, w))
        encode, centroids = self.encoder(device), self.centroids.to(device)
        # images per step: the upsampled codes of one step stay within chunk_elements floats
        step = max(1, min(batch_size, chunk_elements // max(1, out_h * out_w * max(encode.dim, patches.shape[-1]))))
        masks = []
        for s in range(0, n, step):
            codes = upsample_codes(encode.raw(patches[s : s + step]), (out_h, out_w))
            if self.crf is None:
                ids = assign(codes.reshape(-1, encode.dim), centroids, chunk_elements)[0]
            else:
                ids = self.refine(codes, images[s : s + step], chunk_elements)
            masks.append(ids.reshape(-1, out_h, out_w).to(torch.uint8).cpu())
            if progress is not None:
                progress(min(n, s + step), n)
        return torch.cat(masks) if masks else torch.zeros(0, out_h, out_w, dtype=torch.uint8)

    def refine(self, codes: torch.Tensor, images: torch.Tensor, chunk_elements: int = 1 << 24) -> torch.Tensor:
        """Class ids ``[B, H, W]`` of unit codes ``[B, H, W, C]`` (:func:`upsample_codes`) refined by the
        dense CRF on their images ``[B, 3, H', W']`` in [-1, 1]: per image, the probe's probabilities
        ``softmax(-alpha |c - m_k|^2 / 2)`` (see :class:`~sgdm.annotation.config.CRFConfig`), the image
        area-resized to the grid, :func:`~sgdm.annotation.crf.dense_crf`, then the most probable class.
        Kernel widths, in pixels of the images, scale by grid side / image side; a block of the CRF's
        kernel holds at most ``chunk_elements`` entries."""
        if self.crf is None:
            raise ValueError("Segmenter.refine: this segmenter has no dense CRF (its crf is None or not enabled); "
                             "build it with crf=CRFConfig(enabled=True)")
        b, out_h, out_w, _ = codes.shape
        images = torch.as_tensor(images).to(codes.device, torch.float32)
        if images.dim() != 4 or images.shape[0] != b or images.shape[1] != 3:
            raise ValueError(f"images: expected [{b}, 3, H, W] (the images of the patches), got {tuple(images.shape)}")
        if images.numel() and (images.min() < -1.01 or images.max() > 1.01):
            raise ValueError(f"images: expected values in [-1, 1], got [{float(images.min()):.3g}, {float(images.max()):.3g}]")
        cells_per_pixel = math.sqrt(out_h * out_w / (images.shape[2] * images.shape[3]))  # equal axes for square images
        params = scaled(self.crf, cells_per_pixel)
        grid = F.interpolate((images + 1) / 2, size=(out_h, out_w), mode="area").clamp(0, 1)
        centroids = self.centroids.to(codes.device)
        block = max(1, chunk_elements // (out_h * out_w))
        ids = []
        for code, image in zip(codes, grid):
            d2 = torch.cdist(code.reshape(-1, code.shape[-1]), centroids).square()  # [H W, K]
            probs = torch.softmax(-self.crf.alpha * d2 / 2, dim=1).t().reshape(-1, out_h, out_w)
            ids.append(dense_crf(image, probs, params, block).argmax(0))
        return torch.stack(ids)

    def save(self, path: str | os.PathLike, metadata: Optional[dict[str, str]] = None) -> pathlib.Path:
        """One safetensors file (written atomically): ``centroids``, the head's ``head.*`` weights,
        and in its metadata ``mask_size``, with CRF on ``crf`` (the settings as JSON), and the caller's
        ``metadata`` (which :meth:`load` ignores)."""
        from sgdm.annotation.store import save_tensors_atomic
        from sgdm.config.core import to_dict

        tensors = {"centroids": self.centroids}
        if self.head is not None:
            tensors.update({f"head.{k}": v.detach().cpu() for k, v in self.head.state_dict().items()})
        path = pathlib.Path(path)
        metadata = {**(metadata or {}), "mask_size": str(self.mask_size)}
        if self.crf is not None:
            metadata["crf"] = json.dumps(to_dict(self.crf))
        save_tensors_atomic(path, tensors, metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Segmenter":
        from sgdm.annotation.store import read_tensors

        path = pathlib.Path(path)
        tensors, metadata = read_tensors(path, "segmenter file")
        recorded = metadata.get("mask_size", "0")  # files without it drew patch-grid maps
        try:
            mask_size = int(recorded)
        except ValueError:
            raise ValueError(f"segmenter file {path}: metadata mask_size {recorded!r} is not an integer") from None
        crf = _load_crf(path, metadata.get("crf"))  # files without it: CRF off
        if "centroids" not in tensors:
            raise ValueError(f"segmenter file {path} has no 'centroids' tensor")
        state = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
        head = None
        if state:
            dim, in_dim = state["linear.weight"].shape[:2]
            head = SegmentationHead(in_dim, dim)
            head.load_state_dict(state)
            head.eval().requires_grad_(False)
        return cls(tensors["centroids"], head, mask_size, crf)


def _load_crf(path: pathlib.Path, recorded: Optional[str]) -> Optional[CRFConfig]:
    """The CRF settings in a segmenter file's metadata (JSON), validated; None where absent. Settings
    recorded before ``normalization`` existed refined with raw message sums: ``none``."""
    from sgdm.config.core import from_dict

    if recorded is None:
        return None
    try:
        settings = json.loads(recorded)
        if isinstance(settings, dict):
            settings.setdefault("normalization", "none")
        return from_dict(CRFConfig, settings, "crf")
    except ValueError as err:  # json's errors and ConfigError are ValueErrors
        raise ValueError(f"segmenter file {path}: metadata {err}") from None


def fit_segmenter(patches, cls: torch.Tensor, num_classes: int, stego_cfg, kmeans_cfg, generator,
                  device="cpu", log=None, distributed: bool = False, fit_patches: int = 100_000,
                  checkpoint: Optional[HeadCheckpoint] = None) -> Segmenter:
    """Fit f on patch features ``[N, h, w, D]``: ``stego_cfg.method == "stego"`` trains the head
    (resumable with ``checkpoint``, see :func:`train_head`), then the cluster probe on its normalised
    codes; ``"kmeans"`` fits k-means on the normalised features. The probe is fitted (on rank 0) on
    at most ``fit_patches`` random patches; under ``distributed`` every rank gets rank 0's centroids."""
    rank, world = _rank_world(distributed)
    head = None
    if stego_cfg.method == "stego":
        head = train_head(patches, cls, stego_cfg, generator, device, log, distributed, checkpoint)
    encode = _Encoder(head, stego_cfg.dim if head is not None else patches.shape[-1], device)
    centroids = torch.empty(num_classes, encode.dim, device=device)
    failures = Failures("fitting the cluster probe", device, distributed)
    with failures.held():  # on rank 0 alone: the others wait for its centroids
        if rank == 0:
            fit = _probe_sample(patches, encode, fit_patches, stego_cfg.batch_size, generator)
            centroids = kmeans_from_config(fit.to(device), num_classes, kmeans_cfg, generator).centroids
    failures.settle()
    if world > 1:
        import torch.distributed as dist

        dist.broadcast(centroids, 0)
    return Segmenter(centroids, head, stego_cfg.mask_size, stego_cfg.crf)


def segment(patches, cls: torch.Tensor, num_classes: int, stego_cfg, kmeans_cfg, generator,
            device="cpu", log=None, distributed: bool = False, fit_patches: int = 100_000,
            segmenter: Optional[Segmenter] = None, images=None,
            progress: Optional[Callable[[int, int], None]] = None, chunks: Optional[MaskChunks] = None,
            group=None) -> Optional[torch.Tensor]:
    """Class maps ``[N, s, s]`` uint8 (``s = stego_cfg.mask_size``, or the segmenter's; ``[N, h, w]``
    for 0) with values in ``[0, K)`` from patch features ``[N, h, w, D]``
    (a tensor or a :class:`~sgdm.annotation.patches.ShardPatches`; memory stays a few batches).

    Fits f with :func:`fit_segmenter` unless ``segmenter`` is given, then assigns
    every patch batch by batch. ``distributed``: each rank assigns a contiguous
    share of the images, and rank 0 returns all class maps (other ranks return None).
    ``images``: the images of the patches, required with CRF on (see :meth:`Segmenter.assign`);
    a lazy source is read only for this rank's share. ``progress(done, share)``: see :meth:`Segmenter.assign`.

    ``chunks``: the maps are assigned ``chunks.rows`` images at a time, chunks dealt round-robin to
    the ranks, each written as soon as it is done; chunks already written for the same segmenter,
    features and settings are read instead (a resumed run). ``group``: the process group of the
    gather to rank 0 (annotate's, which waits longer than torch's default: ranks may finish up to a
    chunk apart).
    """
    rank, world = _rank_world(distributed)
    if segmenter is None:
        segmenter = fit_segmenter(patches, cls, num_classes, stego_cfg, kmeans_cfg, generator, device, log,
                                  distributed, fit_patches)
    if chunks is not None:
        return _segment_chunks(patches, segmenter, stego_cfg, kmeans_cfg, device, rank, world, images, progress,
                               chunks, group)
    n = len(patches)
    share = -(-n // world)
    lo, hi = min(n, rank * share), min(n, (rank + 1) * share)
    masks = segmenter.assign(_Rows(patches, lo, hi), stego_cfg.batch_size, kmeans_cfg.chunk_elements, device,
                             None if images is None else _Rows(images, lo, hi), progress)
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world if rank == 0 else None
        dist.gather_object(masks, gathered, dst=0)  # rank 0 alone receives every rank's maps
        masks = torch.cat(gathered) if rank == 0 else None
    return masks


def _segment_chunks(patches, segmenter: Segmenter, stego_cfg, kmeans_cfg, device, rank: int, world: int, images,
                    progress, chunks: MaskChunks, group) -> Optional[torch.Tensor]:
    """:func:`segment` a chunk at a time, skipping the chunks written before (see its ``chunks``)."""
    n = len(patches)
    hw = segmenter.mask_hw(patches.shape[1:3])
    weights = {"centroids": segmenter.centroids}
    if segmenter.head is not None:
        weights.update({f"head.{k}": v for k, v in segmenter.head.state_dict().items()})
    chunks = chunks.bind({"segmenter": tensor_digest(*weights.values()), "rows": n, "mask_hw": list(hw),
                          "crf": None if segmenter.crf is None else dataclasses.asdict(segmenter.crf),
                          "batch_size": stego_cfg.batch_size, "chunk_elements": kmeans_cfg.chunk_elements})
    count = -(-n // chunks.rows)
    done = set(from_rank0(lambda: chunks.finished(n, hw), rank, world, "reading the mask chunks"))
    if done and rank == 0 and chunks.log is not None:
        chunks.log(f"annotate: resuming mask assignment, {len(done)} of {count} chunks of {chunks.rows} images "
                   f"already assigned in {chunks.directory}")
    left = [c for c in range(count) if c not in done]
    mine = left[rank::world]
    share = sum(hi - lo for lo, hi in map(lambda c: chunks.span(c, n), mine))
    new, finished = {}, 0
    # a chunk a rank each round, then a meeting: a rank whose chunk failed (an image that can no longer be read
    # for the CRF) stops the others after their chunk, not at the gather after all of theirs
    failures = Failures("assigning masks", device, world > 1, group)
    for r in range(-(-len(left) // world)):
        with failures.held():
            if r < len(mine):
                c = mine[r]
                lo, hi = chunks.span(c, n)
                report = None if progress is None else (lambda d, _, base=finished: progress(base + d, share))
                new[c] = segmenter.assign(_Rows(patches, lo, hi), stego_cfg.batch_size, kmeans_cfg.chunk_elements,
                                          device, None if images is None else _Rows(images, lo, hi), report)
                chunks.save(c, new[c])
                finished += hi - lo
        failures.settle()
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world if rank == 0 else None
        dist.gather_object(new, gathered, dst=0, group=group)
        if rank != 0:
            return None
        new = {c: m for part in gathered for c, m in part.items()}
    if count == 0:
        return torch.zeros(0, *hw, dtype=torch.uint8)
    return torch.cat([new[c] if c in new else chunks.load(c) for c in range(count)])


class _Rows:
    """Rows ``[lo, hi)`` of a tensor, a :class:`~sgdm.annotation.patches.ShardPatches` or an image
    source, sliced lazily."""

    def __init__(self, patches, lo: int, hi: int):
        self.patches, self.lo, self.hi = patches, lo, hi
        if hasattr(patches, "shape"):
            self.shape = (hi - lo, *patches.shape[1:])

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, index: slice):
        start, stop, _ = index.indices(len(self))
        return self.patches[self.lo + start : self.lo + stop]
