"""Closed-form Gaussian data used across tests: x0 ~ N(mu, s^2 I).

The exact denoiser is ``D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)`` and the
probability-flow ODE has the solution ``x(b) = mu + (x(a) - mu) sqrt(s^2 + b^2) / sqrt(s^2 + a^2)``.
"""

import jax.numpy as jnp
import numpy as np

MU = 0.3
S = 0.8


def denoiser(mu=MU, s=S):
    """JAX exact denoiser ``D(x, sigma[B], cond)``."""

    def d(x, sigma, cond=None):
        sig = jnp.reshape(sigma, sigma.shape + (1,) * (x.ndim - 1))
        return mu + s**2 / (s**2 + sig**2) * (x - mu)

    return d


def denoiser_np(x, sigma, mu=MU, s=S):
    """float64 numpy exact denoiser."""
    return mu + s**2 / (s**2 + sigma**2) * (x - mu)


def ode_solution(x_a, a, b, mu=MU, s=S):
    """Exact PF-ODE transport of ``x_a`` from noise level ``a`` to ``b`` (float64)."""
    return mu + (np.asarray(x_a, np.float64) - mu) * np.sqrt(s**2 + b**2) / np.sqrt(s**2 + a**2)
