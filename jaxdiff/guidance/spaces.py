"""Output spaces for space-dependent guidance (APG, CFG-rescale, CFG-Zero*, AG).

At a fixed ``(x, sigma)`` the x0 estimate, the noise estimate, the v-prediction and the
flow velocity are affine in one another, so weight-sum-one combinations (CFG, interval,
autoguidance, PAG) are identical in every space. Nonlinear guiders (norms, projections,
standard deviations, cosines) are not, so they take an explicit ``space``:

* ``"x0"``: the denoiser output ``D`` itself.
* ``"eps"``: the noise estimate ``eps = (x - D) / sigma`` (EDM's sigma space,
  ``x = x0 + sigma n``).
* ``"v"``: the VP v-prediction ``v = alpha eps - sigma_vp x0`` with
  ``alpha = 1 / sqrt(1 + sigma^2)`` and ``sigma_vp = sigma / sqrt(1 + sigma^2)``, i.e.
  ``v = (eps - sigma D) / sqrt(1 + sigma^2)``.
* ``"flow"``: the rectified-flow velocity ``v = n - x0 = eps - D``. Rectified flow lives at
  ``x_t = x / (1 + sigma)`` with ``t = sigma / (1 + sigma)``; ``v = dx_t/dt``.

None of these is defined at ``sigma = 0``; solvers never evaluate the denoiser there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance.base import per_sample

SPACES = ("x0", "eps", "v", "flow")
"""The accepted ``space=`` names."""


def check_space(space: str) -> str:
    """Returns ``space`` if it is one of :data:`SPACES`.

    Raises:
        InvalidArgumentError: for an unknown space.
    """
    if space not in SPACES:
        raise InvalidArgumentError(
            f"unknown guidance space {space!r}: choose one of {', '.join(SPACES)} (e.g. space=x0)"
        )
    return space


def to_space(space: str, x0: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """Maps an x0 estimate at ``(x, sigma)`` to ``space`` (see the module docstring).

    Args:
        space: one of :data:`SPACES`.
        x0: ``[B, ...]`` x0 estimate.
        x: ``[B, ...]`` noisy input (sigma space).
        sigma: scalar or ``[B]`` noise level.
    """
    if check_space(space) == "x0":
        return x0
    s = per_sample(sigma, x)
    eps = (x - x0) / s
    if space == "eps":
        return eps
    if space == "v":
        return (eps - s * x0) / jnp.sqrt(1.0 + s**2)
    return eps - x0


def from_space(space: str, y: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """Inverse of :func:`to_space`: the x0 estimate whose ``space`` value is ``y``."""
    if check_space(space) == "x0":
        return y
    s = per_sample(sigma, x)
    if space == "eps":
        return x - s * y
    if space == "v":
        return (x - s * jnp.sqrt(1.0 + s**2) * y) / (1.0 + s**2)
    return (x - s * y) / (1.0 + s)


def sum_per_sample(a: jax.Array, axes: tuple[int, ...] | None = None) -> jax.Array:
    """Sums over the non-batch axes (or ``axes``), keeping them as size 1 for broadcasting."""
    axes = tuple(range(1, a.ndim)) if axes is None else axes
    return jnp.sum(a, axis=axes, keepdims=True)
