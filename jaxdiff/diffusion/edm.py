"""EDM preconditioning and training distribution (Karras et al. 2022)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.diffusion.formulation import Formulation, Precond


@dataclasses.dataclass(frozen=True)
class EDM(Formulation):
    """EDM: unit-variance network inputs and targets for data of std ``sigma_data``.

    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = log(sigma) / 4``; training sigmas are
    log-normal, ``log sigma ~ N(P_mean, P_std^2)``; the x0-space weight is
    ``(sigma^2 + sd^2) / (sigma sd)^2``.

    Attributes:
        sigma_data: standard deviation of the data (0.5 for images in [-1, 1]).
        p_mean: mean of ``log sigma`` during training.
        p_std: standard deviation of ``log sigma`` during training.
    """

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    def precondition(self, sigma: jax.Array) -> Precond:
        """See :class:`Formulation`."""
        sd2 = self.sigma_data**2
        norm = jax.lax.rsqrt(sigma**2 + sd2)
        return Precond(
            c_skip=sd2 / (sigma**2 + sd2),
            c_out=sigma * self.sigma_data * norm,
            c_in=norm,
            c_noise=jnp.log(sigma) / 4.0,
        )

    def sample_sigma(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """See :class:`Formulation`."""
        return jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, shape, jnp.float32))

    def sigma_from_noise_label(self, c_noise: ArrayLike) -> jax.Array:
        """See :class:`Formulation`."""
        return jnp.exp(4.0 * jnp.asarray(c_noise))
