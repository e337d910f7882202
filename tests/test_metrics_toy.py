"""Exact toy metrics: NLL under the true density, sliced Wasserstein, MMD."""

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from jaxdiff.data import ring_gaussian_mixture, sample_checkerboard, sample_gaussian_mixture
from jaxdiff.metrics import mmd, negative_log_likelihood, sliced_wasserstein
from jaxdiff.metrics.toy import support_fraction, toy_log_prob, wasserstein_1d


def test_swd_of_a_set_with_itself_is_zero():
    x, _ = sample_gaussian_mixture(500, 0)
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x, x[::-1]) == pytest.approx(0.0, abs=1e-12)  # order-free


def test_swd_of_a_shifted_set_matches_the_analytic_value():
    d = 3
    delta = np.full(d, 0.7)
    x = np.random.default_rng(0).standard_normal((2000, d))
    # Same points shifted: every projection moves by theta.delta exactly, so
    # SW_2^2 = E[(theta.delta)^2] = |delta|^2 / d for uniform directions.
    swd = sliced_wasserstein(x, x + delta, num_projections=4000)
    assert swd == pytest.approx(np.linalg.norm(delta) / np.sqrt(d), rel=0.03)
    # Independent samples from N(0, I) and N(delta, I): the same value plus sampling noise.
    y = np.random.default_rng(1).standard_normal((2000, d)) + delta
    swd_ind = sliced_wasserstein(x, y, num_projections=1000)
    assert swd_ind == pytest.approx(np.linalg.norm(delta) / np.sqrt(d), rel=0.1)
    # SW_1 in 2-D: E|cos(phi)| |delta| = (2 / pi) |delta|.
    x2 = x[:, :2]
    sw1 = sliced_wasserstein(x2, x2 + delta[:2], num_projections=4000, p=1)
    assert sw1 == pytest.approx(2 / np.pi * np.linalg.norm(delta[:2]), rel=0.03)


def test_exact_1d_wasserstein_with_unequal_sizes():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(37), rng.standard_normal(53) + 0.3
    assert wasserstein_1d(a, b, p=1) == pytest.approx(wasserstein_distance(a, b), rel=1e-10)
    # W2 by brute force on the common refinement of the two quantile grids
    u = np.linspace(0, 1, 37 * 53 * 4 + 1)[1:] - 1 / (2 * 37 * 53 * 4)
    qa, qb = np.sort(a)[(u * 37).astype(int)], np.sort(b)[(u * 53).astype(int)]
    assert wasserstein_1d(a, b, p=2) == pytest.approx(np.sqrt(np.mean((qa - qb) ** 2)), rel=1e-9)


def test_mmd_near_zero_for_same_distribution_positive_for_shifted():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((600, 2)), rng.standard_normal((700, 2))
    same = mmd(x, y, bandwidth=1.0, chunk_size=128)
    shifted = mmd(x, y + 1.0, bandwidth=1.0)
    assert abs(same) < 5e-3 and shifted > 0.1
    # Unbiased: the estimate for identical distributions averages to ~0 (can be < 0).
    vals = [mmd(rng.standard_normal((200, 2)), rng.standard_normal((200, 2))) for _ in range(10)]
    assert abs(np.mean(vals)) < 3e-3 and min(vals) < 0


def test_nll_of_true_samples_estimates_the_entropy():
    mix = ring_gaussian_mixture()
    log_prob = toy_log_prob("toy_gmm")
    x, _ = sample_gaussian_mixture(20_000, 0, mix)
    big, _ = sample_gaussian_mixture(200_000, 1, mix)
    entropy = -np.mean(mix.log_prob(big))
    # Well-separated components: H ~ log K + entropy of one 2-D Gaussian.
    assert entropy == pytest.approx(np.log(8) + np.log(2 * np.pi * np.e * 0.2**2), abs=0.01)
    assert negative_log_likelihood(x, log_prob) == pytest.approx(entropy, abs=0.03)
    # Collapsing onto the modes lowers NLL: the metric rewards density, not coverage.
    assert negative_log_likelihood(mix.means, log_prob) < entropy


def test_checkerboard_nll_and_support():
    log_prob = toy_log_prob("checkerboard")
    x, _ = sample_checkerboard(1000, 0)
    assert negative_log_likelihood(x, log_prob) == pytest.approx(np.log(8.0))
    assert support_fraction(x, log_prob) == 1.0
    off = np.array([[0.5, -0.5], [0.5, 0.5]])  # a white cell and a black cell
    assert support_fraction(off, log_prob) == 0.5
    assert negative_log_likelihood(off, log_prob) == np.inf
    with pytest.raises(ValueError, match="two moons"):
        toy_log_prob("moons")
