"""Continuous-time variance-preserving noise schedules ``alpha(t)``, ``t`` in [0, 1].

Each schedule maps time to EDM sigma (``sigma(t) = sigma_vp(t) / alpha(t)``) and back,
in closed form, so VP-trained networks plug into the sigma-space samplers.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


class VPSchedule(abc.ABC):
    """A VP schedule given by ``log(alpha(t)^2)``; ``sigma_vp^2 = 1 - alpha^2``."""

    @abc.abstractmethod
    def log_alpha2(self, t: ArrayLike) -> jax.Array:
        """Returns ``log(alpha(t)^2)`` (non-increasing in ``t``, 0 at ``t=0``)."""

    @abc.abstractmethod
    def t_from_sigma(self, sigma: ArrayLike) -> jax.Array:
        """Returns the time at which the EDM noise level equals ``sigma``."""

    def alpha(self, t: ArrayLike) -> jax.Array:
        """Returns the signal scale ``alpha(t)``."""
        return jnp.exp(0.5 * self.log_alpha2(t))

    def sigma(self, t: ArrayLike) -> jax.Array:
        """Returns the EDM noise level ``sqrt(1 / alpha(t)^2 - 1)``."""
        return jnp.sqrt(jnp.expm1(-self.log_alpha2(t)))


@dataclasses.dataclass(frozen=True)
class LinearVPSchedule(VPSchedule):
    """DDPM's linear beta schedule in continuous time (score_sde's VP SDE).

    ``beta(t) = beta_min + t (beta_max - beta_min)`` and
    ``log alpha^2 = -(beta_min t + (beta_max - beta_min) t^2 / 2)``.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def log_alpha2(self, t: ArrayLike) -> jax.Array:
        """See :class:`VPSchedule`."""
        t = jnp.asarray(t)
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def t_from_sigma(self, sigma: ArrayLike) -> jax.Array:
        """Solves the quadratic ``beta_min t + db t^2 / 2 = log(1 + sigma^2)`` for ``t``."""
        db = self.beta_max - self.beta_min
        rhs = jnp.log1p(jnp.asarray(sigma) ** 2)
        return (jnp.sqrt(self.beta_min**2 + 2.0 * db * rhs) - self.beta_min) / db


@dataclasses.dataclass(frozen=True)
class CosineVPSchedule(VPSchedule):
    """The cosine schedule of Nichol & Dhariwal, ``alpha(t) = cos((t+s)/(1+s) pi/2) / c0``.

    ``alpha(1) = 0`` (infinite sigma), so callers keep ``t`` a little below 1.
    """

    s: float = 0.008

    def _angle0(self) -> float:
        return self.s / (1.0 + self.s) * math.pi / 2

    def log_alpha2(self, t: ArrayLike) -> jax.Array:
        """See :class:`VPSchedule`."""
        angle = (jnp.asarray(t) + self.s) / (1.0 + self.s) * (math.pi / 2)
        return 2.0 * (jnp.log(jnp.cos(angle)) - math.log(math.cos(self._angle0())))

    def t_from_sigma(self, sigma: ArrayLike) -> jax.Array:
        """Inverts ``alpha = 1 / sqrt(1 + sigma^2)`` through ``arccos``."""
        alpha = jax.lax.rsqrt(1.0 + jnp.asarray(sigma) ** 2)
        angle = jnp.arccos(alpha * math.cos(self._angle0()))
        return angle * (2.0 / math.pi) * (1.0 + self.s) - self.s


def get_vp_schedule(name: str) -> VPSchedule:
    """Returns a VP schedule by name: ``"linear"`` or ``"cosine"``.

    Raises:
        ValueError: for an unknown name.
    """
    if name == "linear":
        return LinearVPSchedule()
    if name == "cosine":
        return CosineVPSchedule()
    raise ValueError(f"unknown VP schedule {name!r}: use 'linear' or 'cosine'")
