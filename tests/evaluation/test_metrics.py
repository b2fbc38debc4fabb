"""Metric code against hand-computed values, in float64."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from sgdm.evaluation.metrics import (
    GaussianStats,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_stats,
    inception_score,
    kernel_inception_distance,
)


def _stats(mu, sigma):
    return GaussianStats(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64), 100)


def test_frechet_distance_of_known_diagonal_gaussians():
    # d^2 = |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 for diagonal covariances.
    a = _stats([0.0, 1.0, 2.0], np.diag([1.0, 4.0, 9.0]))
    b = _stats([1.0, 1.0, 0.0], np.diag([4.0, 1.0, 9.0]))
    expected = (1 + 0 + 4) + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-10)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_full_covariances(generator):
    d = 6
    m1 = torch.randn(d, d, generator=generator, dtype=torch.float64)
    m2 = torch.randn(d, d, generator=generator, dtype=torch.float64)
    s1, s2 = m1 @ m1.T + 0.1 * torch.eye(d, dtype=torch.float64), m2 @ m2.T
    mu1 = torch.randn(d, generator=generator, dtype=torch.float64)
    mu2 = torch.randn(d, generator=generator, dtype=torch.float64)
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * np.trace(covmean))
    got = frechet_distance(GaussianStats(mu1, s1, 10), GaussianStats(mu2, s2, 10))
    assert got == pytest.approx(expected, rel=1e-8)


def test_gaussian_stats_is_unbiased_covariance(generator):
    x = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    stats = gaussian_stats(x)
    assert torch.allclose(stats.sigma, torch.from_numpy(np.cov(x.numpy(), rowvar=False)))
    assert torch.allclose(stats.mu, x.mean(0))


def test_frechet_distance_from_features_of_shifted_samples(generator):
    x = torch.randn(4000, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(4000, 3, generator=generator, dtype=torch.float64) + torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    # True distance 4; sampling error is O(d / sqrt(N)).
    assert frechet_distance_from_features(x, y) == pytest.approx(4.0, abs=0.25)
    assert frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-8)


def _kid_direct(x, y):
    m = x.shape[0]
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_direct_double_sum(generator):
    x = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(7, 3, generator=generator, dtype=torch.float64) + 0.5
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=7, generator=generator)
    assert mean == pytest.approx(_kid_direct(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_matches_torch_fidelity_estimator(generator):
    from torch_fidelity.metric_kid import kernel_poly, mmd2

    x = torch.randn(20, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(20, 5, generator=generator, dtype=torch.float64) * 1.5
    kxx, kxy, kyy = (kernel_poly(a.numpy(), b.numpy(), degree=3, gamma=None, coef0=1) for a, b in ((x, x), (x, y), (y, y)))
    expected = mmd2(kxx, kxy, kyy)
    mean, _ = kernel_inception_distance(x, y, subsets=1, subset_size=20, generator=generator)
    assert mean == pytest.approx(float(expected), rel=1e-9)


def test_kid_of_identical_sets_is_near_zero_and_shift_is_positive(generator):
    x = torch.randn(300, 8, generator=generator, dtype=torch.float64)
    same, _ = kernel_inception_distance(x, x.clone(), subsets=20, subset_size=100, generator=generator)
    shifted, _ = kernel_inception_distance(x, x + 1.0, subsets=20, subset_size=100, generator=generator)
    assert abs(same) < 0.05 * shifted
    assert shifted > 0.1


def test_inception_score_of_uniform_and_confident_predictions():
    uniform = torch.full((40, 10), 0.1, dtype=torch.float64)
    assert inception_score(uniform, splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)
    confident = torch.eye(10, dtype=torch.float64).repeat(4, 1)
    mean, std = inception_score(confident, splits=4)
    assert mean == pytest.approx(10.0, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_two_classes_hand_computed():
    # p(y|x) = (0.75, 0.25) and (0.25, 0.75): marginal uniform, KL = 0.75 ln 1.5 + 0.25 ln 0.5.
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert inception_score(probs, splits=1)[0] == pytest.approx(math.exp(kl), rel=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: gaussian_stats(torch.zeros(1, 3)), "at least 2"),
        (lambda: gaussian_stats(torch.zeros(3)), r"\[N, D\]"),
        (lambda: gaussian_stats(torch.tensor([[0.0], [float("nan")]])), "NaN"),
        (lambda: frechet_distance_from_features(torch.zeros(3, 2), torch.zeros(3, 4)), "dimensions differ"),
        (lambda: kernel_inception_distance(torch.zeros(3, 2), torch.zeros(3, 4)), "dimensions differ"),
        (lambda: inception_score(torch.full((4, 2), 0.7)), "probability vectors"),
        (lambda: inception_score(torch.full((4, 2), 0.5), splits=5), "splits"),
    ],
)
def test_metric_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
