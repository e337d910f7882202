"""Variance-preserving formulations: epsilon-prediction and v-prediction."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.diffusion.formulation import Formulation, Precond, expand_to
from jaxdiff.diffusion.vp_schedules import LinearVPSchedule, VPSchedule


@dataclasses.dataclass(frozen=True)
class _VPBase(Formulation):
    schedule: VPSchedule = LinearVPSchedule()
    t_min: float = 1e-3
    t_max: float = 0.999
    noise_label_scale: float = 1000.0

    def __post_init__(self):
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(
                f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}"
            )

    def sample_sigma(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Draws ``t ~ U(t_min, t_max)`` and returns ``sigma(t)``."""
        t = jax.random.uniform(key, shape, jnp.float32, self.t_min, self.t_max)
        return self.schedule.sigma(t)

    def sigma_from_noise_label(self, c_noise: ArrayLike) -> jax.Array:
        """See :class:`Formulation`."""
        return self.schedule.sigma(jnp.asarray(c_noise) / self.noise_label_scale)

    def _noise_label(self, sigma: jax.Array) -> jax.Array:
        return self.noise_label_scale * self.schedule.t_from_sigma(sigma)


@dataclasses.dataclass(frozen=True)
class VPEpsilon(_VPBase):
    """Epsilon-prediction (DDPM) on a VP schedule.

    The network sees ``x_vp = alpha x`` and time label ``noise_label_scale * t`` and predicts
    the noise: ``D = x - sigma F`` (``c_skip = 1``, ``c_out = -sigma``,
    ``c_in = 1 / sqrt(1 + sigma^2)``). The loss is epsilon MSE; training draws
    ``t ~ U(t_min, t_max)``.

    With ``schedule=DiscreteVPSchedule()`` and ``noise_label_scale=1000`` this is DiT's
    (and ADM's) DDPM: the network receives the fractional step index and ``D`` is
    ``sqrt(1 / abar) x_vp - sqrt(1 / abar - 1) eps``, the reference's ``pred_xstart``.

    Attributes:
        schedule: the VP schedule (linear, cosine or the discrete DDPM table).
        t_min: smallest training time.
        t_max: largest training time (below 1 for the cosine schedule, where sigma(1)=inf).
        noise_label_scale: network time label is ``noise_label_scale * t``.
    """

    def precondition(self, sigma: jax.Array) -> Precond:
        """See :class:`Formulation`."""
        return Precond(
            c_skip=jnp.ones_like(sigma),
            c_out=-sigma,
            c_in=jax.lax.rsqrt(1.0 + sigma**2),
            c_noise=self._noise_label(sigma),
        )

    def target(self, x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
        """The noise itself."""
        del x0, sigma
        return noise


@dataclasses.dataclass(frozen=True)
class VPrediction(_VPBase):
    """v-prediction (Salimans & Ho 2022): ``v = alpha n - sigma_vp x0``.

    ``c_skip = 1 / (1 + sigma^2)``, ``c_out = -sigma / sqrt(1 + sigma^2)``,
    ``c_in = 1 / sqrt(1 + sigma^2)``: EDM's preconditioning with ``sigma_data = 1`` up to the
    sign of ``c_out``. The loss is v MSE.

    Attributes:
        schedule: the VP schedule (linear or cosine).
        t_min: smallest training time.
        t_max: largest training time.
        noise_label_scale: network time label is ``noise_label_scale * t``.
    """

    def precondition(self, sigma: jax.Array) -> Precond:
        """See :class:`Formulation`."""
        norm = jax.lax.rsqrt(1.0 + sigma**2)
        return Precond(
            c_skip=norm**2, c_out=-sigma * norm, c_in=norm, c_noise=self._noise_label(sigma)
        )

    def target(self, x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
        """``alpha n - sigma_vp x0`` with ``alpha = 1 / sqrt(1 + sigma^2)``."""
        alpha = expand_to(jax.lax.rsqrt(1.0 + sigma**2), x0)
        return alpha * noise - alpha * expand_to(sigma, x0) * x0
