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


def exact_edm_net(formulation, mu=MU, s=S):
    """A raw EDM network ``(params, x_in, label, cond) -> F`` whose preconditioned
    denoiser under ``formulation`` (an EDM with labels ``log(sigma) / 4``) is the exact D."""
    from jaxdiff.diffusion.formulation import expand_to

    def net(params, x_in, label, cond):
        del params, cond
        sigma = jnp.exp(4.0 * label)
        c = formulation.precondition(sigma)
        x = x_in / expand_to(c.c_in, x_in)
        d = mu + s**2 / expand_to(s**2 + sigma**2, x) * (x - mu)
        return (d - expand_to(c.c_skip, x) * x) / expand_to(c.c_out, x)

    return net
