"""Euler's method for the probability-flow ODE (first order, one evaluation per step)."""

from __future__ import annotations

import dataclasses

import jax

from jaxdiff.guidance.base import GuideOut
from jaxdiff.samplers.base import Solver


def euler_update(out: GuideOut, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array):
    """One Euler step ``x + (sigma_next - sigma) (x - x0) / sigma``.

    With a separate re-noising estimate (CFG++) the step is written as
    ``x0 + (sigma_next / sigma) (x - x0_renoise)``, which equals the Euler step when both
    estimates coincide.
    """
    if out.x0_renoise is None:
        return x + (sigma_next - sigma) * (x - out.x0) / sigma
    return out.x0 + (sigma_next / sigma) * (x - out.x0_renoise)


@dataclasses.dataclass(frozen=True)
class Euler(Solver):
    """Euler's method in sigma (EDM) space: order 1, NFE = N.

    In sigma space Euler is DDIM with ``eta = 0`` (and rectified-flow Euler for flow models).
    It honours ``GuideOut.x0_renoise`` (CFG++), see :func:`euler_update`.
    """

    honours_renoise = True

    def step(self, den, x, i, sigmas, state, ev, key):
        """See :class:`Solver`."""
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        out, ev = den(x, sigma, ev)
        return euler_update(out, x, sigma, sigma_next), state, ev


def euler() -> Euler:
    """Returns the Euler solver."""
    return Euler()
