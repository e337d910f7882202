"""Ancestral sampling: DDIM(eta) and Euler ancestral, one evaluation per step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdiff.samplers.base import Solver, normal_like


def ancestral_split(sigma: jax.Array, sigma_next: jax.Array, eta: float):
    """Splits a step into deterministic ``sigma_down`` and fresh noise ``sigma_up``.

    ``sigma_up = min(sigma_next, eta sigma_next sqrt(sigma^2 - sigma_next^2) / sigma)`` and
    ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``, so the marginal noise level at the end
    of the step is ``sigma_next`` whatever ``eta``.
    """
    up = eta * sigma_next * jnp.sqrt(jnp.maximum(sigma**2 - sigma_next**2, 0.0)) / sigma
    up = jnp.minimum(sigma_next, up)
    return jnp.sqrt(jnp.maximum(sigma_next**2 - up**2, 0.0)), up


class _EtaSolver(Solver):
    """A solver whose noise is scaled by ``eta``: stochastic only when ``eta > 0``."""

    eta: float

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Only ``eta > 0`` draws noise, so deterministic runs need no key."""
        return self.eta > 0


@dataclasses.dataclass(frozen=True)
class EulerAncestral(_EtaSolver):
    """Euler ancestral (k-diffusion): an Euler step to ``sigma_down``, then noise ``sigma_up``.

    ``x' = x + (sigma_down - sigma) d + s_noise sigma_up z`` with ``d = (x - x0) / sigma``.
    NFE = N. ``eta = 1`` is DDPM's ancestral sampler; ``eta = 0`` is Euler.

    Attributes:
        eta: fraction of the step's noise that is fresh (0 = deterministic).
        s_noise: scale of the fresh noise.
    """

    eta: float = 1.0
    s_noise: float = 1.0

    def step(self, den, x, i, sigmas, state, ev, key):
        """See :class:`Solver`."""
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        out, ev = den(x, sigma, ev)
        down, up = ancestral_split(sigma, sigma_next, self.eta)
        d = (x - out.x0) / sigma
        x = x + (down - sigma) * d + self.s_noise * up * normal_like(key, x)
        return x, state, ev


@dataclasses.dataclass(frozen=True)
class DDIM(_EtaSolver):
    """DDIM (Song et al. 2021) with stochasticity ``eta``, computed in VP coordinates.

    With ``abar = 1 / (1 + sigma^2)``, ``x_vp = sqrt(abar) x`` and
    ``c = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')``::

        x_vp' = sqrt(abar') x0 + sqrt(1 - abar' - c^2) eps + c z

    Mapped back to sigma space this is exactly Euler ancestral with the same ``eta``, and
    ``eta = 0`` is Euler (tests check both). A separate re-noising estimate (CFG++) sets
    ``eps``. NFE = N.

    Attributes:
        eta: 0 = deterministic DDIM, 1 = DDPM-like ancestral sampling.
    """

    eta: float = 0.0

    def step(self, den, x, i, sigmas, state, ev, key):
        """See :class:`Solver`."""
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        out, ev = den(x, sigma, ev)
        renoise = out.x0 if out.x0_renoise is None else out.x0_renoise
        eps = (x - renoise) / sigma
        abar, abar_next = 1.0 / (1.0 + sigma**2), 1.0 / (1.0 + sigma_next**2)
        c2 = self.eta**2 * (1.0 - abar_next) / (1.0 - abar) * (1.0 - abar / abar_next)
        c2 = jnp.clip(c2, 0.0, 1.0 - abar_next)
        x_vp = (
            jnp.sqrt(abar_next) * out.x0
            + jnp.sqrt(1.0 - abar_next - c2) * eps
            + jnp.sqrt(c2) * normal_like(key, x)
        )
        return x_vp / jnp.sqrt(abar_next), state, ev


def euler_ancestral(eta: float = 1.0, s_noise: float = 1.0) -> EulerAncestral:
    """Returns the Euler ancestral solver."""
    return EulerAncestral(eta=eta, s_noise=s_noise)


def ddim(eta: float = 0.0) -> DDIM:
    """Returns the DDIM solver (``eta=0`` deterministic)."""
    return DDIM(eta=eta)
