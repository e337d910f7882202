"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver in log-sigma."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxdiff.samplers.base import Solver


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2M(Solver):
    """DPM-Solver++(2M): exponential integrator on the data prediction, one NFE per step.

    With ``t = -log sigma`` and ``h = t_next - t``, a step is
    ``x' = (sigma_next / sigma) x - expm1(-h) x0_d``, where
    ``x0_d = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}`` and ``r = h_{i-1} / h`` extrapolates
    from the previous step's estimate (kept in the solver state, so shapes stay fixed).
    The first step and a step that lands on sigma 0 are first order. Order 2; NFE = N.
    It has no place for a separate re-noising estimate, so
    :func:`~jaxdiff.samplers.sample` refuses CFG++ with it.
    """

    def init(self, x, sigmas):
        """The previous step's x0 estimate (zeros before the first step)."""
        del sigmas
        return jnp.zeros_like(x)

    def step(self, den, x, i, sigmas, state, ev, key):
        """See :class:`Solver`."""
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_prev = sigmas[jnp.maximum(i - 1, 0)]
        out, ev = den(x, sigma, ev)
        x0 = out.x0
        lands = sigma_next > 0
        # Guard the logs so the unused branch of a where never produces inf/nan.
        safe_next = jnp.where(lands, sigma_next, sigma * 0.5)
        h = jnp.log(sigma) - jnp.log(safe_next)
        h_last = jnp.log(sigma_prev) - jnp.log(sigma)
        second = (i > 0) & lands
        r = jnp.where(second, h_last / h, 1.0)
        x0_d = x0 + jnp.where(second, 0.5 / r, 0.0) * (x0 - state)
        x_next = (safe_next / sigma) * x - jnp.expm1(-h) * x0_d
        return jnp.where(lands, x_next, x0_d), x0, ev


def dpmpp_2m() -> DPMSolverPP2M:
    """Returns DPM-Solver++(2M)."""
    return DPMSolverPP2M()
