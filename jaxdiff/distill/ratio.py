"""Density ratio from discriminator logits and f-distill's two-stage weight normalisation.

Everything here runs in float32 under ``stop_gradient``: the weights scale the generator's
gradient but are not differentiated. Means are over the *global* batch; inside a
``jax.jit`` with sharded inputs (GSPMD) ``jnp.mean`` already is the all-reduced mean, and
``axis_name`` adds a ``pmean`` for ``shard_map``/``pmap`` callers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.distill.divergences import weighting


def _pmean(x: jax.Array, axis_name: str | None) -> jax.Array:
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def density_ratio(
    logits: jax.Array, *, logit_clip: float = 10.0, lo: float = 0.1, hi: float = 20.0
) -> jax.Array:
    """``r = clip(exp(clip(logits, +-logit_clip)), lo, hi)`` in float32, no gradient.

    Args:
        logits: ``[B]`` (or ``[heads, B]``, averaged over the leading axis first)
            discriminator logits estimating ``log(p_teacher / p_student)``.
        logit_clip: clip of the logits before the exponential.
        lo: smallest ratio.
        hi: largest ratio.
    """
    logits = jax.lax.stop_gradient(jnp.asarray(logits, jnp.float32))
    if logits.ndim == 2:
        logits = jnp.mean(logits, axis=0)
    return jnp.clip(jnp.exp(jnp.clip(logits, -logit_clip, logit_clip)), lo, hi)


def time_bins(t: jax.Array, num_bins: int, t_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """Index of the equal-width bin of ``t`` in ``t_range`` (clipped to ``[0, num_bins)``)."""
    lo, hi = t_range
    idx = jnp.floor((jnp.asarray(t, jnp.float32) - lo) / (hi - lo) * num_bins).astype(jnp.int32)
    return jnp.clip(idx, 0, num_bins - 1)


TIME_BIN_COORDINATES = ("karras_index", "sigma")
"""What the per-time ratio bins split: jaxdiff's normalised Karras index ``t`` in [0, 1]
(default) or the noise level ``sigma`` in ``[sigma_min, sigma_max]`` (FastGen's EDM form,
whose time *is* sigma)."""


def bin_coordinate(
    t: jax.Array, sigma: jax.Array, coordinate: str, sigma_range: tuple[float, float]
) -> tuple[jax.Array, tuple[float, float]]:
    """The values and range that :func:`time_bin_normalize` splits into equal-width bins.

    Args:
        t: ``[B]`` normalised Karras indices in [0, 1].
        sigma: ``[B]`` the noise levels of ``t``.
        coordinate: one of :data:`TIME_BIN_COORDINATES`.
        sigma_range: ``(sigma_min, sigma_max)`` of the time grid.

    Returns:
        ``(t, (0, 1))`` for ``"karras_index"``, ``(sigma, sigma_range)`` for ``"sigma"``.

    Raises:
        ValueError: for an unknown coordinate.
    """
    if coordinate == "karras_index":
        return t, (0.0, 1.0)
    if coordinate == "sigma":
        return sigma, (float(sigma_range[0]), float(sigma_range[1]))
    raise ValueError(f"time_bin_coordinate={coordinate!r}: choose one of {TIME_BIN_COORDINATES}")


def time_bin_normalize(
    r: jax.Array,
    t: jax.Array,
    bin_means: jax.Array,
    *,
    t_range: tuple[float, float] = (0.0, 1.0),
    ema: float = 0.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Stage 1: divides ``r`` by its (EMA-smoothed) batch mean in the time bin of ``t``.

    Args:
        r: ``[B]`` ratios.
        t: ``[B]`` binning coordinate in ``t_range``: normalised Karras indices (jaxdiff's
            default) or noise levels (FastGen's EDM form); :func:`bin_coordinate` gives
            both with their range.
        bin_means: ``[num_bins]`` running per-bin means (start at ones).
        t_range: the range split into ``num_bins`` equal-width bins.
        ema: smoothing rate of the bin means (0 = this batch's means only).
        axis_name: optional mapped axis to all-reduce over.

    Returns:
        ``(r / bin_mean[bin(t)], new_bin_means)``; a bin with no sample keeps its mean.
    """
    r = jax.lax.stop_gradient(jnp.asarray(r, jnp.float32))
    num_bins = bin_means.shape[0]
    idx = time_bins(t, num_bins, t_range)
    onehot = jax.nn.one_hot(idx, num_bins, dtype=jnp.float32)
    counts = _pmean(jnp.sum(onehot, axis=0), axis_name)
    sums = _pmean(onehot.T @ r, axis_name)
    batch_mean = sums / jnp.maximum(counts, 1e-12)
    new = jnp.where(counts > 0, ema * bin_means + (1.0 - ema) * batch_mean, bin_means)
    return r / new[idx], new


def f_weights(r: jax.Array, kind: str, *, axis_name: str | None = None) -> jax.Array:
    """Stage 2: ``h(r) / max(mean(h), 1e-6)``, whose batch mean is 1.

    ``max`` rather than ``+ 1e-6`` keeps reverse-KL's constant ``h`` at exactly 1, so
    reverse-KL f-distill *is* DMD2 bit for bit.
    """
    h = weighting(kind)(jax.lax.stop_gradient(jnp.asarray(r, jnp.float32)))
    return h / jnp.maximum(_pmean(jnp.mean(h), axis_name), 1e-6)


__all__ = [
    "TIME_BIN_COORDINATES",
    "bin_coordinate",
    "density_ratio",
    "f_weights",
    "time_bin_normalize",
    "time_bins",
]
