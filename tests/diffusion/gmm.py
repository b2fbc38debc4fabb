"""A 2-D Gaussian mixture whose exact denoiser is known in closed form (float64).

With x_0 ~ sum_k pi_k N(mu_k, S_k), the marginal of x_t = sqrt(a) x_0 + sqrt(1 - a) eps
is sum_k pi_k N(sqrt(a) mu_k, a S_k + (1 - a) I), so the optimal noise prediction
is eps*(x_t, t) = -sqrt(1 - a) grad log p_t(x_t), with
grad log p_t(x) = sum_k r_k(x) C_k^{-1} (m_k - x) (r_k: posterior responsibilities).
"""
from __future__ import annotations

import torch

WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
MEANS = torch.tensor([[-2.0, 0.0], [1.5, 1.0]], dtype=torch.float64)
COVS = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.25, -0.05], [-0.05, 0.4]]], dtype=torch.float64)


def mixture_moments(weights=WEIGHTS, means=MEANS, covs=COVS):
    mean = (weights[:, None] * means).sum(0)
    second = (weights[:, None, None] * (covs + means[:, :, None] * means[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


def responsibilities(x, a, weights=WEIGHTS, means=MEANS, covs=COVS):
    """r_k(x) [B, K] and the marginal's per-component (m_k, C_k^{-1}) at alpha_bar a [B]."""
    a = a.view(-1, 1, 1, 1)
    cov_t = a * covs + (1 - a) * torch.eye(2, dtype=torch.float64)  # [B, K, 2, 2]
    m_t = a.view(-1, 1, 1).sqrt() * means  # [B, K, 2]
    prec = torch.linalg.inv(cov_t)
    d = x[:, None, :] - m_t
    maha = torch.einsum("bki,bkij,bkj->bk", d, prec, d)
    logp = weights.log() - 0.5 * maha - 0.5 * torch.logdet(cov_t)
    return logp.softmax(-1), d, prec


def exact_eps(x, a, weights=WEIGHTS, means=MEANS, covs=COVS):
    """eps*(x_t) for x [B, 2] float64 at alpha_bar a [B] float64."""
    r, d, prec = responsibilities(x, a, weights, means, covs)
    score = -(r[..., None] * torch.einsum("bkij,bkj->bki", prec, d)).sum(1)
    return -(1 - a).sqrt()[:, None] * score


def make_denoiser(schedule, weights=WEIGHTS, means=MEANS, covs=COVS):
    def denoise(x, t):
        return exact_eps(x, schedule.alpha_bar[t], weights, means, covs).to(x.dtype)
    return denoise


def make_eps_model(schedule):
    """A conditional eps model: cond one-hot [B, 2] picks a component; zeros = the mixture."""
    def eps_model(x, t, cond, cond_map):
        a = schedule.alpha_bar[t]
        out = exact_eps(x, a)
        if cond is not None:
            for k in range(len(WEIGHTS)):
                rows = cond[:, k] > 0
                if rows.any():
                    one = torch.ones(1, dtype=torch.float64)
                    out[rows] = exact_eps(x[rows], a[rows], one, MEANS[k:k + 1], COVS[k:k + 1])
        return out
    return eps_model


def component_fractions(x):
    """Fraction of samples whose most likely component (at a = 1) is k."""
    r, _, _ = responsibilities(x, torch.ones(len(x), dtype=torch.float64) - 1e-9)
    return torch.bincount(r.argmax(-1), minlength=len(WEIGHTS)).double() / len(x)
