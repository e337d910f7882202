"""Inception Score and Kernel Inception Distance, as the reference evaluators compute them.

**Inception Score** (Salimans et al., 2016), in the form of the ADM evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``, ``compute_inception_score``): the
class probabilities ``p(y|x_i)`` are cut into consecutive splits of ``split_size = 5000``
samples (the last split keeps the remainder, however small), and each split scores

    IS = exp( mean_i sum_y p(y|x_i) (log p(y|x_i) - log p(y)) ),  p(y) = mean_i p(y|x_i)

over its own samples; the reported number is the mean over splits (50 000 samples give 10
splits). ``splits=n`` instead cuts the samples into ``n`` near-equal parts at
``i * N // n`` (improved-gan, torch-fidelity). Computed in float64 from logits with a
stable log-softmax, and ``0 log 0 = 0``, so saturated predictions give a finite score
where ADM's float32 ``log`` would give NaN. ADM's logits are the pool3 features times
the Inception graph's ``softmax/logits`` weight *without* its bias (1008 classes).

**KID** (Binkowski et al., 2018): the unbiased estimator of the squared MMD with the
cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``,

    MMD^2 = sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (n(n-1))
            - 2 sum_{i,j} k(x_i,y_j) / (m n),

averaged over ``num_subsets = 100`` random subsets of ``subset_size = 1000`` samples of
each set, drawn without replacement (clean-fid / torch-fidelity / StyleGAN2-ADA
convention). Like clean-fid and StyleGAN2-ADA, the subset size is clipped to the smaller
set, so small sets still give a value; the subsets come from a seeded numpy generator,
so a result is reproducible. The standard deviation over subsets is also returned
(torch-fidelity's ``kernel_inception_distance_std``). KID can be slightly negative: the
estimator is unbiased, so its value scatters around 0 for identical distributions.
"""

from __future__ import annotations

import numpy as np
from jax.typing import ArrayLike

ADM_SPLIT_SIZE = 5000
"""Samples per Inception Score split in the ADM evaluator."""

KID_NUM_SUBSETS = 100
"""Subsets KID is averaged over (clean-fid, torch-fidelity)."""

KID_SUBSET_SIZE = 1000
"""Samples per KID subset (clean-fid, torch-fidelity)."""

_PROB_ATOL = 1e-3  # float32 softmax rows over ~1000 classes sum to 1 only to ~1e-6


def _log_probs(logits: ArrayLike | None, probs: ArrayLike | None) -> np.ndarray:
    """``[N, C]`` float64 log-probabilities from exactly one of ``logits`` / ``probs``."""
    if (logits is None) == (probs is None):
        raise ValueError("pass exactly one of logits= or probs= to inception_score")
    x = np.asarray(logits if logits is not None else probs, np.float64)
    name = "logits" if logits is not None else "probs"
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] < 2:
        raise ValueError(f"{name} must be [N > 0, C >= 2] class scores, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} hold NaN or inf: check the classifier's outputs")
    if logits is not None:
        shifted = x - x.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    sums = x.sum(axis=1)
    if x.min() < 0 or not np.allclose(sums, 1.0, rtol=0.0, atol=_PROB_ATOL):
        worst = int(np.argmax(np.abs(sums - 1.0)))
        raise ValueError(
            f"probs must be non-negative rows summing to 1 (min {x.min():.3g}, row {worst} "
            f"sums to {sums[worst]:.6g}): pass raw scores as logits= instead"
        )
    with np.errstate(divide="ignore"):
        return np.log(x)


def _split_bounds(n: int, split_size: int | None, splits: int | None) -> list[tuple[int, int]]:
    if split_size is not None and splits is not None:
        raise ValueError(
            f"pass split_size= (ADM: consecutive chunks) or splits= (equal parts), not both; "
            f"got split_size={split_size}, splits={splits}"
        )
    if splits is not None:
        if not 1 <= splits <= n:
            raise ValueError(f"splits must be in [1, {n}] for {n} samples, got {splits}")
        return [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    size = ADM_SPLIT_SIZE if split_size is None else split_size
    if size < 1:
        raise ValueError(f"split_size must be >= 1, got {size}")
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def inception_score_splits(
    logits: ArrayLike | None = None,
    *,
    probs: ArrayLike | None = None,
    split_size: int | None = None,
    splits: int | None = None,
) -> np.ndarray:
    """The Inception Score of each split (see the module doc for the formula).

    Args:
      logits: ``[N, C]`` classifier logits (softmax is taken here, in float64).
      probs: ``[N, C]`` class probabilities instead of ``logits``.
      split_size: Samples per consecutive split (default and ADM: 5000; the last split
        keeps the remainder).
      splits: Number of near-equal splits instead (improved-gan: 10).

    Returns:
      ``[num_splits]`` float64 scores, each in ``[1, C]``.

    Raises:
      ValueError: On bad shapes, non-finite values, probabilities that are not
        distributions, or bad split arguments.
    """
    log_p = _log_probs(logits, probs)
    scores = []
    for start, stop in _split_bounds(log_p.shape[0], split_size, splits):
        part = np.exp(log_p[start:stop])
        marginal = part.mean(axis=0, keepdims=True)
        # A class a sample gives no mass to contributes 0 log 0 = 0: mask the -inf logs
        # (the marginal is positive wherever any sample's probability is).
        part_log = np.where(part > 0, log_p[start:stop], 0.0)
        log_marginal = np.log(np.where(marginal > 0, marginal, 1.0))
        terms = part * (part_log - log_marginal)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return np.asarray(scores, np.float64)


def inception_score(
    logits: ArrayLike | None = None,
    *,
    probs: ArrayLike | None = None,
    split_size: int | None = None,
    splits: int | None = None,
) -> float:
    """Inception Score: the mean over splits, as the ADM evaluator prints it.

    Args:
      logits: ``[N, C]`` classifier logits.
      probs: ``[N, C]`` class probabilities instead of ``logits``.
      split_size: Samples per consecutive split (default and ADM: 5000).
      splits: Number of near-equal splits instead (improved-gan: 10).

    Returns:
      The score, in ``[1, C]``. For the spread over splits use
      :func:`inception_score_splits`.

    Example:
      >>> inception_score(probs=np.eye(4))  # four samples, four distinct classes
      4.0
    """
    return float(
        np.mean(inception_score_splits(logits, probs=probs, split_size=split_size, splits=splits))
    )


def _as_features(x: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be [N >= 2, D] features, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} hold NaN or inf: check the feature network's outputs")
    return x


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: ArrayLike, y: ArrayLike) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel ``(x.y / d + 1)^3``.

    Args:
      x: ``[M >= 2, D]`` features.
      y: ``[N >= 2, D]`` features (sizes may differ).

    Returns:
      The estimate (float64; may be slightly negative).
    """
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: x is {x.shape[1]}-d, y is {y.shape[1]}-d")
    m, n = x.shape[0], y.shape[0]
    kxx, kyy = _poly_kernel(x, x), _poly_kernel(y, y)
    off_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    off_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(off_xx + off_yy - 2.0 * _poly_kernel(x, y).sum() / (m * n))


def kid(
    real_features: ArrayLike,
    fake_features: ArrayLike,
    *,
    num_subsets: int = KID_NUM_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> dict[str, float]:
    """Kernel Inception Distance in any feature space (see the module doc).

    Args:
      real_features: ``[N, D]`` reference features.
      fake_features: ``[M, D]`` generated features.
      num_subsets: Subsets to average over.
      subset_size: Samples per subset of each set; clipped to ``min(N, M)``.
      seed: Seed of the subset draws.

    Returns:
      ``{"kid": mean, "kid_std": standard deviation over subsets}`` (float64).

    Raises:
      ValueError: On bad shapes, mismatched feature sizes or non-positive arguments.
    """
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"feature sizes differ: real is {real.shape[1]}-d, fake is {fake.shape[1]}-d; "
            "use the same feature network for both"
        )
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(
            f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets} and {subset_size}"
        )
    m = min(subset_size, real.shape[0], fake.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = fake[rng.choice(fake.shape[0], m, replace=False)]
        y = real[rng.choice(real.shape[0], m, replace=False)]
        values[i] = mmd2_unbiased(x, y)
    return {"kid": float(values.mean()), "kid_std": float(values.std())}


def adm_spatial_features(activations: ArrayLike) -> np.ndarray:
    """Spatial (sFID) features from activations, laid out as the ADM evaluator does.

    ADM takes the Inception graph's ``mixed_6/conv`` activations ``[N, 17, 17, C]``
    (NHWC), keeps the first 7 channels and flattens each example in ``H, W, C`` order:
    ``17 * 17 * 7 = 2023`` features, whose statistics are ``mu_s``/``sigma_s`` of its
    reference batches. sFID is the Frechet distance of those statistics
    (:func:`jaxdiff.metrics.frechet_distance`).

    Args:
      activations: ``[N, H, W, C >= 7]`` channels-last activations.

    Returns:
      ``[N, H * W * 7]`` float64 features.
    """
    a = np.asarray(activations)
    if a.ndim != 4 or a.shape[-1] < 7:
        raise ValueError(
            f"spatial activations must be NHWC [N, H, W, C >= 7], got shape {a.shape}; "
            "transpose NCHW activations to NHWC first"
        )
    return np.asarray(a[..., :7], np.float64).reshape(a.shape[0], -1)
