"""Exact and sample-based metrics for 2-D toy distributions.

* **NLL** (:func:`negative_log_likelihood`): mean ``-log p(x)`` of generated samples
  under the *true* density (exact for the Gaussian mixture and the checkerboard; two
  moons has no closed form). For samples drawn from ``p`` it estimates the entropy
  ``H(p)``; it is *not* the model's likelihood of data. Low NLL alone can mean mode
  collapse onto high-density regions, so read it together with SWD/MMD. The
  checkerboard density is uniform on its support, so its NLL is ``log(area)`` or ``inf``;
  :func:`support_fraction` is the informative number there.
* **Sliced Wasserstein distance** (:func:`sliced_wasserstein`): ``(E_theta W_p^p(theta.X,
  theta.Y))^(1/p)`` over ``num_projections`` unit directions drawn from a fixed seed, with
  each 1-D ``W_p`` exact between the empirical distributions (sorting; sets of different
  sizes are handled through their quantile functions).
* **MMD** (:func:`mmd`): unbiased estimator of the squared maximum mean discrepancy with
  the Gaussian kernel ``k(a, b) = exp(-|a - b|^2 / (2 h^2))``, computed in row chunks.

All in float64 numpy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from jax.typing import ArrayLike

from jaxdiff.data.toys import checkerboard_log_prob, ring_gaussian_mixture

LogProb = Callable[[np.ndarray], np.ndarray]


def toy_log_prob(name: str) -> LogProb:
    """The exact log-density of a named toy dataset (its default parameters).

    Args:
      name: ``"toy_gmm"`` (alias ``"gmm"``) or ``"checkerboard"``.

    Returns:
      ``log_prob(x [..., 2]) -> float64 [...]``.

    Raises:
      ValueError: For ``"moons"`` (no closed form) or an unknown name.
    """
    if name in ("toy_gmm", "gmm"):
        return ring_gaussian_mixture().log_prob
    if name == "checkerboard":
        return checkerboard_log_prob
    raise ValueError(
        f"no exact density for toy {name!r}: NLL is available for 'toy_gmm' and "
        "'checkerboard' (two moons has no closed-form density)"
    )


def negative_log_likelihood(samples: ArrayLike, log_prob: LogProb) -> float:
    """Mean ``-log p(x)`` of samples under a true density (``inf`` if any has p = 0).

    Args:
      samples: ``[N, d]`` points.
      log_prob: Exact log-density, e.g. :func:`toy_log_prob`.

    Returns:
      The mean negative log-density in nats.
    """
    return float(-np.mean(log_prob(np.asarray(samples, np.float64))))


def support_fraction(samples: ArrayLike, log_prob: LogProb) -> float:
    """Fraction of samples where the true density is positive."""
    return float(np.mean(np.isfinite(log_prob(np.asarray(samples, np.float64)))))


def wasserstein_1d(a: ArrayLike, b: ArrayLike, p: float = 2.0) -> float:
    """Exact ``W_p`` between two 1-D empirical distributions (uniform weights).

    ``W_p^p = int_0^1 |F_a^-1(u) - F_b^-1(u)|^p du``; with equal sizes this is the mean
    of ``|sort(a) - sort(b)|^p``.

    Args:
      a: ``[N]`` values.
      b: ``[M]`` values.
      p: Order >= 1.

    Returns:
      ``W_p`` (not raised to ``p``).
    """
    return float(
        _wasserstein_pp(
            np.sort(np.asarray(a, np.float64))[:, None],
            np.sort(np.asarray(b, np.float64))[:, None],
            p,
        )[0]
    ) ** (1.0 / p)


def _wasserstein_pp(a_sorted: np.ndarray, b_sorted: np.ndarray, p: float) -> np.ndarray:
    """``W_p^p`` per column of column-sorted ``[N, K]`` and ``[M, K]`` arrays."""
    n, m = a_sorted.shape[0], b_sorted.shape[0]
    if n == m:
        return np.mean(np.abs(a_sorted - b_sorted) ** p, axis=0)
    # Quantile functions are step functions; merge their breakpoints i/n and j/m.
    u = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    widths = np.diff(np.concatenate([[0.0], u]))
    mids = u - widths / 2
    ia = np.minimum((mids * n).astype(np.int64), n - 1)
    ib = np.minimum((mids * m).astype(np.int64), m - 1)
    return np.sum(widths[:, None] * np.abs(a_sorted[ia] - b_sorted[ib]) ** p, axis=0)


def random_directions(dim: int, num: int, seed: int = 0) -> np.ndarray:
    """``[num, dim]`` unit vectors, uniform on the sphere, from a fixed numpy seed."""
    v = np.random.default_rng(seed).standard_normal((num, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sliced_wasserstein(
    x: ArrayLike, y: ArrayLike, *, num_projections: int = 256, p: float = 2.0, seed: int = 0
) -> float:
    """Sliced ``W_p`` distance ``(mean_theta W_p^p(theta.x, theta.y))^(1/p)``.

    Args:
      x: ``[N, d]`` samples.
      y: ``[M, d]`` samples.
      num_projections: Number of random directions.
      p: Order >= 1 (1 or 2 usually).
      seed: Seed of the directions (same seed -> same directions -> comparable values).

    Returns:
      The distance (0 for identical sets).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [N, d] and [M, d], got {x.shape} and {y.shape}")
    theta = random_directions(x.shape[1], num_projections, seed)
    wpp = _wasserstein_pp(np.sort(x @ theta.T, axis=0), np.sort(y @ theta.T, axis=0), p)
    return float(np.mean(wpp) ** (1.0 / p))


def kernel_mean(
    x: ArrayLike,
    y: ArrayLike | None = None,
    *,
    bandwidth: float = 1.0,
    chunk_size: int = 2048,
) -> float:
    """Mean Gaussian kernel value over pairs, computed in row chunks (float64).

    Args:
      x: ``[N, d]`` points.
      y: ``[M, d]`` points, or None for pairs within ``x`` excluding ``i == j``.
      bandwidth: Kernel width ``h`` of ``exp(-|a - b|^2 / (2 h^2))``.
      chunk_size: Rows per chunk.

    Returns:
      ``mean_{i, j} k(x_i, y_j)``, or ``mean_{i != j} k(x_i, x_j)`` when ``y`` is None.
    """
    x = np.asarray(x, np.float64)
    b = x if y is None else np.asarray(y, np.float64)
    total = 0.0
    b_sq = np.einsum("ij,ij->i", b, b)
    for start in range(0, x.shape[0], chunk_size):
        ac = x[start : start + chunk_size]
        sq = np.einsum("ij,ij->i", ac, ac)[:, None] + b_sq[None, :] - 2.0 * ac @ b.T
        total += float(np.exp(-np.maximum(sq, 0.0) / (2.0 * bandwidth**2)).sum())
    n, m = x.shape[0], b.shape[0]
    if y is None:
        return (total - n) / (n * (n - 1))  # drop the diagonal, k(x, x) = 1
    return total / (n * m)


def mmd(
    x: ArrayLike,
    y: ArrayLike,
    *,
    bandwidth: float = 1.0,
    chunk_size: int = 2048,
    y_kernel_mean: float | None = None,
) -> float:
    """Unbiased squared MMD with a Gaussian (RBF) kernel of width ``bandwidth``.

    ``MMD^2_u = sum_{i != j} k(x_i, x_j) / (n (n - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
    - 2 sum_{i, j} k(x_i, y_j) / (n m)``. Unbiased, so it fluctuates around 0 (and can be
    slightly negative) when both sets come from the same distribution.

    Args:
      x: ``[N, d]`` samples, N >= 2.
      y: ``[M, d]`` samples, M >= 2 (e.g. the reference set).
      bandwidth: Kernel width ``h`` (in data units).
      chunk_size: Rows per kernel chunk.
      y_kernel_mean: Precomputed ``kernel_mean(y, bandwidth=bandwidth)`` (the reference
        term, O(M^2)), to reuse across evaluations against the same ``y``.

    Returns:
      The estimate of ``MMD^2``.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] < 2 or y.shape[0] < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need [N >= 2, d] and [M >= 2, d] samples, got {x.shape} and {y.shape}")
    kw = dict(bandwidth=bandwidth, chunk_size=chunk_size)
    kyy = kernel_mean(y, **kw) if y_kernel_mean is None else y_kernel_mean
    return float(kernel_mean(x, **kw) + kyy - 2.0 * kernel_mean(x, y, **kw))
