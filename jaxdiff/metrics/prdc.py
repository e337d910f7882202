"""Precision/recall (k-NN manifolds) and density/coverage, in any feature space.

With real features ``R = {r_i}`` (N of them) and generated features ``G = {g_j}`` (M), let
``NND_k(x; S)`` be the distance from ``x`` to its k-th nearest neighbour in ``S`` other than
itself, and ``B(x, r)`` the closed ball of radius ``r`` around ``x``.

* **Precision** (Kynkaanniemi et al., 2019): fraction of generated samples inside the
  real manifold ``U_i B(r_i, NND_k(r_i; R))``; how many samples look real.
* **Recall** (same paper): fraction of real samples inside the generated manifold
  ``U_j B(g_j, NND_k(g_j; G))``; how much of the data is covered. Paper default k = 3.
* **Density** (Naeem et al., 2020): ``1/(k M) sum_j sum_i 1[g_j in B(r_i, NND_k(r_i; R))]``;
  counts how many real balls hold each sample, so unlike precision it is not fooled
  by outliers that inflate a ball. Its expectation is 1 when ``G`` and ``R`` come from
  the same distribution; it can exceed 1.
* **Coverage** (same paper): fraction of real samples whose ball ``B(r_i, NND_k(r_i; R))``
  holds at least one generated sample. Paper default k = 5.

All distances are Euclidean, computed in float64 numpy in row chunks (memory is
``chunk_size x max(N, M)`` floats), so tens of thousands of samples fit anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from jax.typing import ArrayLike

DEFAULT_CHUNK = 1024


def _as_features(x: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be [N > 0, D] features, got shape {x.shape}")
    return x


def _distance_chunks(
    a: np.ndarray, b: np.ndarray, chunk_size: int
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yields ``(rows, D)`` with ``D[i, j] = |a[rows][i] - b[j]|`` (float64)."""
    b_sq = np.einsum("ij,ij->i", b, b)
    for start in range(0, a.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, a.shape[0]))
        ac = a[rows]
        sq = np.einsum("ij,ij->i", ac, ac)[:, None] + b_sq[None, :] - 2.0 * ac @ b.T
        yield rows, np.sqrt(np.maximum(sq, 0.0))


def pairwise_distances(a: ArrayLike, b: ArrayLike, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """All Euclidean distances ``[N, M]`` between rows of ``a`` and ``b`` (float64)."""
    a, b = _as_features(a, "a"), _as_features(b, "b")
    out = np.empty((a.shape[0], b.shape[0]))
    for rows, d in _distance_chunks(a, b, chunk_size):
        out[rows] = d
    return out


def knn_radii(features: ArrayLike, k: int, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """Distance from each point to its k-th nearest *other* point of the same set.

    Args:
      features: ``[N, D]`` with ``N > k``.
      k: Neighbour rank (1 = nearest other point).
      chunk_size: Rows per distance chunk.

    Returns:
      ``[N]`` float64 radii.

    Raises:
      ValueError: If ``k < 1`` or the set has at most ``k`` points.
    """
    x = _as_features(features, "features")
    if k < 1 or x.shape[0] <= k:
        raise ValueError(f"need 1 <= k < number of points, got k={k} for {x.shape[0]} points")
    radii = np.empty(x.shape[0])
    for rows, d in _distance_chunks(x, x, chunk_size):
        # Each row's own zero distance is the 0-th smallest, so index k is the k-th other.
        d[np.arange(d.shape[0]), np.arange(rows.start, rows.stop)] = 0.0
        radii[rows] = np.partition(d, k, axis=1)[:, k]
    return radii


def _ball_counts(
    queries: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: number of balls holding it; per centre: whether any query is inside."""
    counts = np.zeros(queries.shape[0], np.int64)
    hit = np.zeros(centres.shape[0], bool)
    for rows, d in _distance_chunks(queries, centres, chunk_size):
        inside = d <= radii[None, :]
        counts[rows] = inside.sum(axis=1)
        hit |= inside.any(axis=0)
    return counts, hit


def precision_recall(
    real: ArrayLike, fake: ArrayLike, k: int = 3, chunk_size: int = DEFAULT_CHUNK
) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019).

    Args:
      real: ``[N, D]`` reference features.
      fake: ``[M, D]`` generated features.
      k: Neighbour rank of the manifold radii (paper: 3).
      chunk_size: Rows per distance chunk.

    Returns:
      ``{"precision": ..., "recall": ...}`` in [0, 1].
    """
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    real_radii = knn_radii(real, k, chunk_size)
    fake_radii = knn_radii(fake, k, chunk_size)
    in_real, _ = _ball_counts(fake, real, real_radii, chunk_size)
    in_fake, _ = _ball_counts(real, fake, fake_radii, chunk_size)
    return {"precision": float(np.mean(in_real > 0)), "recall": float(np.mean(in_fake > 0))}


def density_coverage(
    real: ArrayLike, fake: ArrayLike, k: int = 5, chunk_size: int = DEFAULT_CHUNK
) -> dict[str, float]:
    """Density and coverage (Naeem et al., 2020).

    Args:
      real: ``[N, D]`` reference features.
      fake: ``[M, D]`` generated features.
      k: Neighbour rank of the real-sample radii (paper: 5).
      chunk_size: Rows per distance chunk.

    Returns:
      ``{"density": ..., "coverage": ...}``; coverage in [0, 1], density >= 0.
    """
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    radii = knn_radii(real, k, chunk_size)
    counts, hit = _ball_counts(fake, real, radii, chunk_size)
    return {
        "density": float(counts.sum() / (k * fake.shape[0])),
        "coverage": float(np.mean(hit)),
    }


def prdc(
    real: ArrayLike,
    fake: ArrayLike,
    *,
    k_pr: int = 3,
    k_dc: int = 5,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, float]:
    """Precision, recall, density and coverage in one call.

    Args:
      real: ``[N, D]`` reference features.
      fake: ``[M, D]`` generated features.
      k_pr: k for precision/recall.
      k_dc: k for density/coverage.
      chunk_size: Rows per distance chunk.

    Returns:
      ``{"precision", "recall", "density", "coverage"}`` floats.
    """
    return {
        **precision_recall(real, fake, k_pr, chunk_size),
        **density_coverage(real, fake, k_dc, chunk_size),
    }
