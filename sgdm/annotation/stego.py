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
weight and shift ``b``. The cluster probe is spherical k-means on the
L2-normalised codes into K classes (STEGO learns the same objective by SGD).

Not done: STEGO's dense CRF refinement. Masks are at the patch grid and are
not CRF-refined; ``method: kmeans`` is the non-parametric baseline (k-means
directly on the patch features).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgdm.annotation.kmeans import assign, kmeans_from_config

__all__ = [
    "SegmentationHead",
    "correlation",
    "correspondence_loss",
    "stego_loss",
    "knn_partners",
    "train_head",
    "segment",
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


def knn_partners(cls: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Indices ``[N, k']`` of each image's nearest neighbours by cosine similarity, itself excluded."""
    x = F.normalize(cls.float(), dim=1)
    k = min(k, x.shape[0] - 1)
    if k < 1:
        return torch.arange(x.shape[0]).unsqueeze(1)  # a single image is its own partner
    out = []
    for start in range(0, x.shape[0], chunk):
        sim = x[start : start + chunk] @ x.t()
        sim[torch.arange(sim.shape[0]), torch.arange(start, start + sim.shape[0])] = -float("inf")
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def train_head(patches: torch.Tensor, cls: torch.Tensor, cfg, generator: torch.Generator, device="cpu",
               log=None) -> SegmentationHead:
    """Train a :class:`SegmentationHead` on frozen ``patches [N, h, w, D]`` (any float dtype)."""
    n = patches.shape[0]
    with torch.random.fork_rng(devices=[]):  # parameter init from our generator, not the global one
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        head = SegmentationHead(patches.shape[-1], cfg.dim).to(device)
    optimiser = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    partners = knn_partners(cls, cfg.knn)

    def maps(idx):
        return patches[idx].to(device).float().permute(0, 3, 1, 2)

    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            pick = torch.randint(partners.shape[1], (idx.numel(),), generator=generator)
            knn = partners[idx, pick]
            rand = torch.randint(n, (idx.numel(),), generator=generator)
            loss, parts = stego_loss(maps(idx), maps(knn), maps(rand), head, cfg, generator)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        if log is not None:
            terms = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
            log(f"stego epoch {epoch + 1}/{cfg.epochs}: loss {float(loss.detach()):.4f} {terms}")
    return head.eval()


@torch.no_grad()
def _codes(head, patches, batch, device) -> torch.Tensor:
    out = []
    for start in range(0, patches.shape[0], batch):
        x = patches[start : start + batch].to(device).float().permute(0, 3, 1, 2)
        out.append(F.normalize(head(x), dim=1).permute(0, 2, 3, 1).cpu())
    return torch.cat(out)


def segment(patches: torch.Tensor, cls: torch.Tensor, num_classes: int, stego_cfg, kmeans_cfg, generator,
            device="cpu", log=None) -> torch.Tensor:
    """Class maps ``[N, h, w]`` uint8 with values in ``[0, K)`` from patch features ``[N, h, w, D]``.

    ``stego_cfg.method == "stego"``: train the head, then the cluster probe on
    its normalised codes; ``"kmeans"``: k-means on normalised patch features.
    The probe is fitted on at most 100k random patches and then assigns every patch.
    """
    if stego_cfg.method == "stego":
        head = train_head(patches, cls, stego_cfg, generator, device, log)
        codes = _codes(head, patches, stego_cfg.batch_size, device)
    else:
        codes = F.normalize(patches.float(), dim=-1)
    n, h, w, d = codes.shape
    flat = codes.reshape(-1, d)
    fit_n = min(flat.shape[0], 100_000)
    fit = flat[torch.randperm(flat.shape[0], generator=generator)[:fit_n]] if fit_n < flat.shape[0] else flat
    result = kmeans_from_config(fit.to(device), num_classes, kmeans_cfg, generator)
    labels, _ = assign(flat.to(device), result.centroids, kmeans_cfg.chunk_elements)
    return labels.reshape(n, h, w).to(torch.uint8).cpu()
