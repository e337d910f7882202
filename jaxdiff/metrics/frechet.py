"""Frechet distance between Gaussians fitted to features, and their statistics files.

The Frechet (2-Wasserstein) distance between ``N(mu1, S1)`` and ``N(mu2, S2)`` is::

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

FID is this distance in the Inception pool3 feature space; FD-digits is it in the digits
classifier's feature space (:mod:`jaxdiff.metrics.fd_digits`).

Everything here is float64 numpy. ``tr((S1 S2)^(1/2))`` is computed without a general
(non-symmetric) matrix square root: ``S1 S2`` has the same eigenvalues as the symmetric
PSD matrix ``M = R^T S2 R`` for any factor ``R R^T = S1`` (Cholesky when ``S1`` or ``S2`` is
positive definite, else the symmetric square root ``S1^(1/2)`` from ``numpy.linalg.eigh``),
so the trace is ``sum_i sqrt(lambda_i(M))`` with round-off negative eigenvalues clipped
to zero. This needs no inverse, so singular and rank-deficient covariances (fewer
samples than dimensions, constant features) are handled exactly, without the
``eps * I`` offset retry that ``scipy.linalg.sqrtm``-based tools need. On
well-conditioned inputs it agrees with the ``sqrtm`` route to round-off.

Statistics files (:func:`save_statistics` / :func:`load_statistics`, defined in
:mod:`jaxdiff.metrics.statistics` and re-exported here) are ``.npz`` with arrays ``mu``
``[D]`` and ``sigma`` ``[D, D]`` -- the layout of pytorch-fid's and EDM's reference
statistics, so those files load directly -- plus metadata keys that those tools ignore.
"""

from __future__ import annotations

import numpy as np
from jax.typing import ArrayLike

from jaxdiff.metrics.statistics import load_statistics, save_statistics


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
    """Returns ``tr((S1 S2)^(1/2))`` for symmetric PSD ``S1``, ``S2`` (float64).

    ``S1 S2`` is similar to the symmetric PSD ``R^T S2 R`` for any ``R`` with
    ``R R^T = S1``, so the trace is the sum of the square roots of that matrix's
    eigenvalues. ``R`` is a Cholesky factor when one of the covariances is positive
    definite (the usual case for a reference set with more samples than dimensions;
    the trace is symmetric in ``S1``, ``S2``), else the eigendecomposition square root
    (exact for singular matrices, a few times slower).

    Args:
      sigma1: ``[D, D]`` covariance.
      sigma2: ``[D, D]`` covariance.

    Returns:
      The trace, a non-negative float.
    """
    s1 = np.asarray(sigma1, np.float64)
    s2 = np.asarray(sigma2, np.float64)
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    root = other = None
    for a, b in ((s1, s2), (s2, s1)):
        try:
            root, other = np.linalg.cholesky(a), b
            break
        except np.linalg.LinAlgError:
            pass
    if root is None:
        root, other = _psd_sqrt(s1), s2
    m = root.T @ other @ root
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, in float64.

    Args:
      mu1: ``[D]`` mean of the first set of features (e.g. generated samples).
      sigma1: ``[D, D]`` covariance of the first set.
      mu2: ``[D]`` mean of the second set (e.g. reference data).
      sigma2: ``[D, D]`` covariance of the second set.

    Returns:
      The distance, a finite float >= 0 (tiny negative round-off is clipped to 0).

    Raises:
      ValueError: On mismatched shapes or non-finite inputs.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
            f"sigma2 {s2.shape}; expected [D] means and [D, D] covariances"
        )
    for name, arr in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} has non-finite values: check the features")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return float(max(fd, 0.0))


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a feature set, as FID tools compute them.

    Args:
      features: ``[N, D]`` features, N >= 2.

    Returns:
      ``(mu [D], sigma [D, D])`` in float64; ``sigma`` uses the ``N - 1`` denominator
      (``numpy.cov(features, rowvar=False)``, as pytorch-fid).

    Raises:
      ValueError: If ``features`` is not 2-D with at least two rows.
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


__all__ = [
    "feature_statistics",
    "frechet_distance",
    "load_statistics",
    "save_statistics",
    "trace_sqrt_product",
]
