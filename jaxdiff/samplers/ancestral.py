"""Ancestral sampling: DDIM(eta) and Euler ancestral, one evaluation per step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdiff.guidance.base import GuideOut
from jaxdiff.samplers.base import Solver, check_hyper, normal_like
from jaxdiff.samplers.euler import euler_update


def ancestral_split(sigma: jax.Array, sigma_next: jax.Array, eta: float):
    """Splits a step into deterministic ``sigma_down`` and fresh noise ``sigma_up``.

    ``sigma_up = min(sigma_next, eta sigma_next sqrt(sigma^2 - sigma_next^2) / sigma)`` and
    ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``, so the marginal noise level at the end
    of the step is ``sigma_next`` whatever ``eta``.
    """
    up = eta * sigma_next * jnp.sqrt(jnp.maximum(sigma**2 - sigma_next**2, 0.0)) / sigma
    up = jnp.minimum(sigma_next, up)
    return jnp.sqrt(jnp.maximum(sigma_next**2 - up**2, 0.0)), up


def ancestral_update(
    out: GuideOut,
    x: jax.Array,
    sigma: jax.Array,
    sigma_next: jax.Array,
    eta: float,
    noise: jax.Array,
) -> jax.Array:
    """One ancestral step ``x0 + sigma_down (x - x0_renoise) / sigma + sigma_up noise``.

    ``(x - x0_renoise) / sigma`` is the noise the step keeps (CFG++ takes it from the
    unconditional estimate; otherwise ``x0_renoise = x0``). Everything is in sigma space,
    with no ``1 - alpha_bar`` that would cancel in float32 at small sigma.

    Args:
        out: the guided denoiser output at ``(x, sigma)``.
        x: current state.
        sigma: current noise level.
        sigma_next: target noise level.
        eta: fraction of the step's noise that is fresh.
        noise: the fresh noise, already scaled (e.g. ``s_noise z``).
    """
    renoise = out.x0 if out.x0_renoise is None else out.x0_renoise
    down, up = ancestral_split(sigma, sigma_next, eta)
    return out.x0 + down * (x - renoise) / sigma + up * noise


class _EtaSolver(Solver):
    """A solver whose noise is scaled by ``eta``: stochastic only when ``eta > 0``."""

    eta: float
    s_noise: float = 1.0  # DDIM keeps this class default; Euler ancestral makes it a field
    honours_renoise = True

    def __post_init__(self):
        check_hyper(type(self).__name__, "eta", self.eta)
        check_hyper(type(self).__name__, "s_noise", self.s_noise)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Only ``eta > 0`` (with ``s_noise > 0``) draws noise; otherwise no key is needed."""
        return self.eta > 0 and self.s_noise > 0

    def step(self, den, x, i, sigmas, state, ev, key):
        """See :class:`Solver`."""
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        out, ev = den(x, sigma, ev)
        if self.eta == 0:
            # sigma_down = sigma_next exactly: the Euler step, with no noise drawn at all.
            return euler_update(out, x, sigma, sigma_next), state, ev
        noise = self.s_noise * normal_like(key, x) if self.stochastic else jnp.zeros_like(x)
        return ancestral_update(out, x, sigma, sigma_next, self.eta, noise), state, ev


@dataclasses.dataclass(frozen=True)
class EulerAncestral(_EtaSolver):
    """Euler ancestral (k-diffusion): an Euler step to ``sigma_down``, then noise ``sigma_up``.

    ``x' = x0 + sigma_down (x - x0_renoise) / sigma + s_noise sigma_up z``, i.e.
    ``x + (sigma_down - sigma) d`` with ``d = (x - x0) / sigma`` when there is no separate
    re-noising estimate; with one (CFG++) this is the CFG++ form of the sampler (as in
    ComfyUI's fork of k-diffusion). NFE = N. ``eta = 1`` is DDPM's ancestral sampler;
    ``eta = 0`` is exactly Euler (no noise is drawn and no key is needed).

    Attributes:
        eta: fraction of the step's noise that is fresh (0 = deterministic).
        s_noise: scale of the fresh noise.
    """

    eta: float = 1.0
    s_noise: float = 1.0


@dataclasses.dataclass(frozen=True)
class DDIM(_EtaSolver):
    """DDIM (Song et al. 2021) with stochasticity ``eta``, computed in sigma space.

    DDIM's VP-coordinate update, with ``abar = 1 / (1 + sigma^2)``, ``x_vp = sqrt(abar) x``,
    ``eps = (x - x0_renoise) / sigma`` and
    ``c = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')``::

        x_vp' = sqrt(abar') x0 + sqrt(1 - abar' - c^2) eps + c z

    divided by ``sqrt(abar')`` is exactly (``c sqrt(1 + sigma'^2) = sigma_up`` of
    :func:`ancestral_split`)::

        x' = x0 + sigma_down eps + sigma_up z

    which is what is computed: the VP form loses float32 precision at small sigma, where
    ``1 - abar`` cancels. So DDIM(eta) is Euler ancestral with the same ``eta``, and
    ``eta = 0`` is exactly Euler. A separate re-noising estimate (CFG++) sets ``eps``.
    NFE = N.

    Attributes:
        eta: 0 = deterministic DDIM, 1 = DDPM-like ancestral sampling.
    """

    eta: float = 0.0


def euler_ancestral(eta: float = 1.0, s_noise: float = 1.0) -> EulerAncestral:
    """Returns the Euler ancestral solver (``eta >= 0``, ``s_noise >= 0``)."""
    return EulerAncestral(eta=eta, s_noise=s_noise)


def ddim(eta: float = 0.0) -> DDIM:
    """Returns the DDIM solver (``eta=0`` deterministic, ``eta >= 0``)."""
    return DDIM(eta=eta)
