"""Explicit conversions between noise-level parametrisations.

jaxdiff's samplers and guidance all speak EDM's sigma space, ``x = x0 + sigma * n``.
Other parametrisations map onto it:

* VP (alpha_t, sigma_t) with ``x_vp = alpha_t x0 + sigma_t n``: ``sigma = sigma_t / alpha_t``
  and ``x = x_vp / alpha_t``; for a variance-preserving process ``alpha_t**2 + sigma_t**2 = 1``,
  so ``alpha_t = 1 / sqrt(1 + sigma**2)``.
* Rectified flow ``x_t = (1 - t) x0 + t n``: ``sigma = t / (1 - t)`` and ``x = x_t / (1 - t)``.
* log-SNR: ``logsnr = -2 log(sigma)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def sigma_to_logsnr(sigma: ArrayLike) -> jax.Array:
    """Returns the log signal-to-noise ratio ``-2 log(sigma)``."""
    return -2.0 * jnp.log(sigma)


def logsnr_to_sigma(logsnr: ArrayLike) -> jax.Array:
    """Returns ``sigma = exp(-logsnr / 2)``, the inverse of :func:`sigma_to_logsnr`."""
    return jnp.exp(-0.5 * jnp.asarray(logsnr))


def sigma_to_vp(sigma: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Returns the variance-preserving ``(alpha_t, sigma_t)`` for an EDM sigma.

    Args:
        sigma: EDM noise level(s), ``>= 0``.

    Returns:
        ``alpha = 1 / sqrt(1 + sigma^2)`` and ``sigma_vp = sigma * alpha``.
    """
    sigma = jnp.asarray(sigma)
    alpha = jax.lax.rsqrt(1.0 + sigma**2)
    return alpha, sigma * alpha


def vp_to_sigma(alpha: ArrayLike, sigma_vp: ArrayLike) -> jax.Array:
    """Returns the EDM sigma ``sigma_vp / alpha`` of a VP noise level."""
    return jnp.asarray(sigma_vp) / jnp.asarray(alpha)


def sigma_to_flow_t(sigma: ArrayLike) -> jax.Array:
    """Returns the rectified-flow time ``t = sigma / (1 + sigma)`` (``t=1`` is pure noise)."""
    sigma = jnp.asarray(sigma)
    return sigma / (1.0 + sigma)


def flow_t_to_sigma(t: ArrayLike) -> jax.Array:
    """Returns the EDM sigma ``t / (1 - t)`` of a rectified-flow time ``t`` in [0, 1)."""
    t = jnp.asarray(t)
    return t / (1.0 - t)


def shift_flow_t(t: ArrayLike, shift: float) -> jax.Array:
    """Applies the resolution time shift ``shift * t / (1 + (shift - 1) t)`` (SD3).

    ``shift > 1`` moves time towards the noisy end, as large images need.
    """
    t = jnp.asarray(t)
    return shift * t / (1.0 + (shift - 1.0) * t)
