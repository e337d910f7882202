"""Flow matching with the rectified-flow (linear) interpolant."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.diffusion.conversions import flow_t_to_sigma, shift_flow_t, sigma_to_flow_t
from jaxdiff.diffusion.formulation import Formulation, Precond


@dataclasses.dataclass(frozen=True)
class FlowMatching(Formulation):
    """Rectified flow: ``x_t = (1 - t) x0 + t n``, the network predicts ``v = n - x0``.

    In EDM space ``sigma = t / (1 - t)`` and ``x = x_t / (1 - t)``, so
    ``c_in = 1 / (1 + sigma)``, ``c_skip = 1 / (1 + sigma)``, ``c_out = -sigma / (1 + sigma)``
    and ``D = x_t - t v``. Training times are logit-normal,
    ``t = sigmoid(m + s z)``, then optionally shifted by ``shift`` (SD3).

    Attributes:
        logit_mean: ``m`` of the logit-normal time distribution.
        logit_std: ``s`` of the logit-normal time distribution.
        shift: time shift (1.0 = none); see :func:`~jaxdiff.diffusion.conversions.shift_flow_t`.
        t_eps: training times are clipped to ``[t_eps, 1 - t_eps]`` to keep sigma finite.
        noise_label_scale: network time label is ``noise_label_scale * t``.
    """

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    t_eps: float = 1e-5
    noise_label_scale: float = 1000.0

    def __post_init__(self):
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    def precondition(self, sigma: jax.Array) -> Precond:
        """See :class:`Formulation`."""
        inv = 1.0 / (1.0 + sigma)
        return Precond(
            c_skip=inv,
            c_out=-sigma * inv,
            c_in=inv,
            c_noise=self.noise_label_scale * sigma_to_flow_t(sigma),
        )

    def sample_sigma(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Draws shifted logit-normal times and returns their sigmas."""
        z = jax.random.normal(key, shape, jnp.float32)
        t = shift_flow_t(jax.nn.sigmoid(self.logit_mean + self.logit_std * z), self.shift)
        return flow_t_to_sigma(jnp.clip(t, self.t_eps, 1.0 - self.t_eps))

    def sigma_from_noise_label(self, c_noise: ArrayLike) -> jax.Array:
        """See :class:`Formulation`."""
        return flow_t_to_sigma(jnp.asarray(c_noise) / self.noise_label_scale)

    def target(self, x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
        """The velocity ``n - x0``."""
        del sigma
        return noise - x0
