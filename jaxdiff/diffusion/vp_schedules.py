"""Variance-preserving noise schedules ``alpha(t)``, ``t`` in [0, 1].

Each schedule maps time to EDM sigma (``sigma(t) = sigma_vp(t) / alpha(t)``) and back, so
VP-trained networks plug into the sigma-space samplers. The continuous schedules do so in
closed form; :class:`DiscreteVPSchedule` (the 1000-step DDPM table of DiT / ADM)
interpolates between its discrete noise levels.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
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
        """See :class:`VPSchedule`.

        ``log(cos(a)^2 / cos(a0)^2)`` with ``a - a0 = k t``, written as
        ``2 log1p(-2 sin((a + a0)/2) sin((a - a0)/2) / cos(a0))``: the difference of the two
        logs of numbers near 1 would cancel most of float32's digits at small ``t``.
        """
        t = jnp.asarray(t)
        k = math.pi / (2.0 * (1.0 + self.s))
        half_sum, half_diff = 0.5 * k * (t + 2.0 * self.s), 0.5 * k * t
        drop = 2.0 * jnp.sin(half_sum) * jnp.sin(half_diff) / math.cos(self._angle0())
        return 2.0 * jnp.log1p(-drop)

    def t_from_sigma(self, sigma: ArrayLike) -> jax.Array:
        """Inverts ``alpha = 1 / sqrt(1 + sigma^2)`` for the angle ``(t + s)/(1 + s) pi/2``.

        ``cos(angle) = cos(angle0) / sqrt(1 + sigma^2)`` gives
        ``tan(angle) = sqrt(sigma^2 + sin^2(angle0)) / cos(angle0)``; ``arctan2`` of that is
        well conditioned at small ``t``, where ``arccos`` of a number near 1 loses about
        half of float32's digits.
        """
        a0 = self._angle0()
        sigma = jnp.asarray(sigma)
        angle = jnp.arctan2(jnp.sqrt(sigma**2 + math.sin(a0) ** 2), math.cos(a0))
        return angle * (2.0 / math.pi) * (1.0 + self.s) - self.s


@dataclasses.dataclass(frozen=True)
class DiscreteVPSchedule(VPSchedule):
    """The discrete DDPM schedule of DiT / ADM: linear betas over ``num_steps`` steps.

    ``betas = linspace(beta_start, beta_end, num_steps)`` (float64, as in DiT's
    ``gaussian_diffusion.get_named_beta_schedule("linear", 1000)``),
    ``alphas_cumprod = cumprod(1 - betas)`` and step ``i`` has the EDM noise level
    ``sigma_i = sqrt(1 / alphas_cumprod[i] - 1)``. Time is ``t = i / num_steps``, so
    ``VPEpsilon(schedule=DiscreteVPSchedule(), noise_label_scale=num_steps)`` hands the
    network the (fractional) DDPM step index ``i``, the timestep DiT was trained on.

    Between steps, ``sigma(t)`` interpolates ``log(sigma)`` linearly in the index and
    ``t_from_sigma`` inverts that piecewise-linear map, as k-diffusion's
    ``DiscreteSchedule`` does. Indices are clamped to ``[0, num_steps - 1]``: ``t`` in
    ``[0, (num_steps - 1) / num_steps]`` is the useful range (``sigma(0) ~ 0.01``,
    ``sigma(0.999) ~ 157`` for the defaults).

    Attributes:
        beta_start: first beta (DDPM: 1e-4, scaled by ``1000 / num_steps`` in DiT).
        beta_end: last beta (DDPM: 0.02).
        num_steps: number of discrete steps (1000).
    """

    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_steps: int = 1000

    def __post_init__(self):
        if self.num_steps < 2 or not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"need num_steps >= 2 and 0 < beta_start <= beta_end < 1, got "
                f"num_steps={self.num_steps}, beta_start={self.beta_start}, "
                f"beta_end={self.beta_end}"
            )

    def sigmas(self) -> np.ndarray:
        """The float64 table ``sqrt(1 / alphas_cumprod - 1)``, increasing, ``[num_steps]``."""
        betas = np.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        return np.sqrt(1.0 / alphas_cumprod - 1.0)

    def _log_sigmas(self) -> jax.Array:
        # A float32 constant of the trace; computed in float64 first, like the reference.
        return jnp.asarray(np.log(self.sigmas()), jnp.float32)

    def sigma(self, t: ArrayLike) -> jax.Array:
        """Returns ``exp`` of the log-sigma table interpolated at index ``t * num_steps``."""
        log_sigmas = self._log_sigmas()
        index = jnp.clip(jnp.asarray(t, jnp.float32) * self.num_steps, 0, self.num_steps - 1)
        # Lower neighbour at most n - 2, so the top index uses weight 1 on the last entry;
        # an integer index gives weight exactly 0 and returns the table value unchanged.
        low = jnp.minimum(jnp.floor(index), self.num_steps - 2).astype(jnp.int32)
        w = index - low
        log_sigma = (1.0 - w) * log_sigmas[low] + w * log_sigmas[low + 1]
        return jnp.exp(log_sigma)

    def log_alpha2(self, t: ArrayLike) -> jax.Array:
        """``-log(1 + sigma(t)^2)``, consistent with the interpolated :meth:`sigma`."""
        return -jnp.log1p(self.sigma(t) ** 2)

    def t_from_sigma(self, sigma: ArrayLike) -> jax.Array:
        """Inverts :meth:`sigma`: the (clamped) fractional index of ``log(sigma)``, over n."""
        log_sigmas = self._log_sigmas()
        index = jnp.interp(
            jnp.log(jnp.asarray(sigma, jnp.float32)),
            log_sigmas,
            jnp.arange(self.num_steps, dtype=jnp.float32),
        )
        return index / self.num_steps


VP_SCHEDULES = {
    "linear": LinearVPSchedule,
    "cosine": CosineVPSchedule,
    "discrete_linear": DiscreteVPSchedule,
}
"""VP schedule classes by name (``discrete_linear`` is DiT's 1000-step DDPM table)."""


def get_vp_schedule(name: str) -> VPSchedule:
    """Returns a VP schedule by name: ``"linear"``, ``"cosine"`` or ``"discrete_linear"``.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in VP_SCHEDULES:
        raise ValueError(f"unknown VP schedule {name!r}: use one of {', '.join(VP_SCHEDULES)}")
    return VP_SCHEDULES[name]()
