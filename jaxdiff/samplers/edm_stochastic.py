"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): churn, then a Heun step."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.samplers.base import Solver, check_hyper, normal_like
from jaxdiff.samplers.heun import heun_update


@dataclasses.dataclass(frozen=True)
class EDMStochastic(Solver):
    """Heun with Langevin-like "churn": noise is added before each step.

    For ``S_tmin <= sigma_i <= S_tmax`` the level is raised to
    ``sigma_hat = sigma_i (1 + gamma)`` with ``gamma = min(S_churn / N, sqrt(2) - 1)`` by
    adding noise of std ``sqrt(sigma_hat^2 - sigma_i^2) S_noise``, then a Heun step goes from
    ``sigma_hat`` to ``sigma_{i+1}``. ``S_churn = 0`` is exactly the deterministic Heun
    sampler: no noise is drawn and no key is needed. NFE = 2N - 1 with a final 0. EDM's
    ImageNet-64 setting: ``S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.003``.

    Attributes:
        s_churn: total churn (>= 0); per-step ``gamma = s_churn / N`` (capped at
            sqrt(2) - 1).
        s_tmin: lowest sigma at which churn is applied (>= 0).
        s_tmax: highest sigma at which churn is applied (>= ``s_tmin``; may be inf).
        s_noise: noise inflation to offset the denoiser's detail loss (>= 0).
    """

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def __post_init__(self):
        for name in ("s_churn", "s_tmin", "s_noise"):
            check_hyper("EDMStochastic", name, getattr(self, name))
        check_hyper("EDMStochastic", "s_tmax", self.s_tmax, low=self.s_tmin, low_name="s_tmin")
        if math.isinf(self.s_churn):
            raise InvalidArgumentError(
                f"EDMStochastic: s_churn must be finite, got {self.s_churn!r}; pass e.g. "
                "s_churn=40 (per-step gamma is capped at sqrt(2) - 1 anyway)"
            )

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Churn draws noise only when ``s_churn > 0`` and ``s_noise > 0``."""
        return self.s_churn > 0 and self.s_noise > 0

    def step(self, den, x, i, sigmas, state, ev, key):
        """See :class:`Solver`."""
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if self.s_churn == 0:
            # No churn: exactly Heun's step, and no noise drawn.
            x, ev = heun_update(den, x, sigma, sigma_next, ev)
            return x, state, ev
        num_steps = sigmas.shape[0] - 1
        in_window = (sigma >= self.s_tmin) & (sigma <= self.s_tmax)
        gamma = jnp.where(in_window, min(self.s_churn / num_steps, math.sqrt(2.0) - 1.0), 0.0)
        sigma_hat = sigma * (1.0 + gamma)
        x_hat = x
        if self.stochastic:
            # sqrt(sigma_hat^2 - sigma^2) written so rounding can never make it negative.
            churn_std = sigma * jnp.sqrt(gamma * (2.0 + gamma))
            x_hat = x + churn_std * self.s_noise * normal_like(key, x)
        x, ev = heun_update(den, x_hat, sigma_hat, sigma_next, ev)
        return x, state, ev


def edm_stochastic(
    s_churn: float = 40.0, s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.003
) -> EDMStochastic:
    """Returns EDM's stochastic sampler; defaults are EDM's ImageNet-64 settings."""
    return EDMStochastic(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
