"""Sample-quality statistics computed from features, in float64.

These are the formulas behind FID, KID and IS, applied to any feature space
(Inception for the standard numbers, an sgdm self-supervised encoder for
``fd_<name>``). torch-fidelity computes the Inception versions itself
(:mod:`sgdm.evaluation.fidelity`); the functions here are the oracle and the
path for every other extractor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "GaussianStats",
    "gaussian_stats",
    "frechet_distance",
    "frechet_distance_from_features",
    "kernel_inception_distance",
    "inception_score",
]


@dataclass
class GaussianStats:
    """Mean ``mu`` [D] and covariance ``sigma`` [D, D] of features, float64."""

    mu: torch.Tensor
    sigma: torch.Tensor
    count: int


def _check_features(features: torch.Tensor, name: str) -> torch.Tensor:
    if features.dim() != 2:
        raise ValueError(f"{name}: expected features of shape [N, D], got {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 feature vectors for a covariance, got {features.shape[0]}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name}: features contain NaN or infinity")
    return features.detach().to("cpu", torch.float64)


def gaussian_stats(features: torch.Tensor, name: str = "features") -> GaussianStats:
    """Sample mean and unbiased covariance of ``features`` [N, D]."""
    f = _check_features(features, name)
    mu = f.mean(0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return GaussianStats(mu, sigma, f.shape[0])


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Frechet distance between N(mu_a, S_a) and N(mu_b, S_b) (Heusel et al. 2017).

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2}).
    tr((S_a S_b)^{1/2}) is computed as the sum of square roots of the
    eigenvalues of the symmetric PSD matrix S_a^{1/2} S_b S_a^{1/2} (same
    spectrum as S_a S_b), which avoids the complex parts scipy's ``sqrtm``
    produces for near-singular covariances.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {tuple(a.mu.shape)} vs {tuple(b.mu.shape)}")
    sa = _psd_sqrt(a.sigma.double())
    middle = sa @ b.sigma.double() @ sa
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0)
    diff = a.mu.double() - b.mu.double()
    value = diff @ diff + a.sigma.double().trace() + b.sigma.double().trace() - 2 * eig.sqrt().sum()
    return float(value.clamp_min(0))


def frechet_distance_from_features(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to features ``x`` [N, D] and ``y`` [M, D]."""
    return frechet_distance(gaussian_stats(x, "x"), gaussian_stats(y, "y"))


def _polynomial_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # k(a, b) = (a.b / d + 1)^3, the KID kernel (Binkowski et al. 2018, Sec. 3).
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m = x.shape[0]
    sum_xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    sum_yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sum_xx + sum_yy - 2 * kxy.mean()


def kernel_inception_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets.

    Returns (mean, std) over ``subsets`` draws of ``subset_size`` vectors from
    each set without replacement (the subset size is capped at the smaller set).
    Identical sets give 0 in expectation (each unbiased estimate is near 0).
    """
    fx = _check_features(x, "x")
    fy = _check_features(y, "y")
    if fx.shape[1] != fy.shape[1]:
        raise ValueError(f"feature dimensions differ: {fx.shape[1]} vs {fy.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, fx.shape[0], fy.shape[0])
    if m < 2:
        raise ValueError(f"subset_size must be >= 2, got {m}")
    values = []
    for _ in range(subsets):
        ix = torch.randperm(fx.shape[0], generator=generator)[:m]
        iy = torch.randperm(fy.shape[0], generator=generator)[:m]
        values.append(_polynomial_mmd(fx[ix], fy[iy]))
    stacked = torch.stack(values)
    std = stacked.std(unbiased=False) if subsets > 1 else torch.zeros((), dtype=torch.float64)
    return float(stacked.mean()), float(std)


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), mean and std over ``splits``.

    ``probs`` [N, C] are class probabilities (rows sum to 1). Uniform
    predictions give 1; confident predictions spread evenly over C classes give C.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs: expected [N, C], got {tuple(probs.shape)}")
    p = probs.detach().to("cpu", torch.float64)
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(p.shape[0], dtype=torch.float64), atol=1e-4):
        raise ValueError("probs: rows must be probability vectors (non-negative, summing to 1)")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be in [1, N={p.shape[0]}], got {splits}")
    scores = []
    for chunk in torch.tensor_split(p, splits):
        marginal = chunk.mean(0, keepdim=True)
        kl = torch.xlogy(chunk, chunk) - torch.xlogy(chunk, marginal.expand_as(chunk))
        scores.append(kl.sum(1).mean().exp())
    stacked = torch.stack(scores)
    std = stacked.std(unbiased=False) if splits > 1 else torch.zeros((), dtype=torch.float64)
    return float(stacked.mean()), float(std)
