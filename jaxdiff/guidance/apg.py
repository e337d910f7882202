"""Adaptive projected guidance (APG; Sadat et al., ICLR 2025), in the paper's form."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance.base import GuideOut, eval_branches, per_sample
from jaxdiff.guidance.checks import check_number
from jaxdiff.guidance.spaces import check_space, from_space, sum_per_sample, to_space


class APGState(NamedTuple):
    """APG's momentum buffer.

    Attributes:
        m: the running average ``m`` after the latest step.
        prev: ``m`` as it was before the latest step (what a corrector evaluation of that
            step builds on, so both evaluations of a step see the same history).
    """

    m: jax.Array
    prev: jax.Array


@flax.struct.dataclass
class APG:
    """Adaptive projected guidance, Algorithm 1 of the paper, applied to ``space`` outputs.

    With ``Delta = y_c - y_u`` (``y`` = denoiser output in ``space``, x0 by default)::

        m     <- Delta + beta m;  Delta <- m              (momentum; beta < 0 "reverse")
        Delta <- Delta min(1, r / ||Delta||) if r > 0     (norm threshold, per sample)
        Delta_par  = (<Delta, y_c> / ||y_c||^2) y_c        (projection on the cond. output)
        Delta_perp = Delta - Delta_par
        y = y_c + (w - 1) (Delta_perp + eta Delta_par)

    ``r = 0`` (like ``r = None`` or ``inf``) means no threshold, as in the paper's reference
    code: ``eta = 1, beta = 0, r = 0`` is CFG ``y_u + w Delta``; ``w = 1`` is ``y_c``. Norms and
    inner products are per sample over ``axes`` (default: all non-batch axes) and guarded
    by ``eps`` (the reference projects in float64; JAX computes in float32).

    **Momentum is updated once per solver step, not once per network call.** The first
    evaluation of a step (``ctx.substep == 0``) updates ``m``; a corrector evaluation of
    the same step (Heun, ``substep == 1``) uses ``Delta_corr + beta m_prev`` with the
    momentum from before the step and leaves the state alone. So Heun with N steps and
    Euler with N steps accumulate the same number of momentum updates, and the corrector
    does not count its own predictor twice. (diffusers updates per call.)

    Attributes:
        scale: ``w`` (scalar or ``[B]``).
        eta: weight of the parallel component (scalar or ``[B]``).
        beta: momentum (scalar or ``[B]``).
        r: norm threshold ``>= 0`` (scalar or ``[B]``); None, 0 or ``inf`` disable it (per
            sample for an array).
        space: static; output space of the update.
        axes: static; axes of the norms/projections (None = all non-batch axes), e.g.
            per frame for video latents.
        eps: static; guard added to squared norms.
    """

    scale: ArrayLike = 2.0
    eta: ArrayLike = 0.0
    beta: ArrayLike = -0.5
    r: ArrayLike | None = 2.5
    space: str = flax.struct.field(pytree_node=False, default="x0")
    axes: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)
    eps: float = flax.struct.field(pytree_node=False, default=1e-12)

    def init(self, x_shape: tuple[int, ...], dtype: Any) -> APGState:
        """Zero momentum, in ``dtype`` (float32, or float64 in a float64 run)."""
        zeros = jnp.zeros(x_shape, dtype)
        return APGState(zeros, zeros)

    def __call__(self, denoise, x: jax.Array, ctx, cond, uncond, state: APGState):
        """Returns the APG x0 estimate (2 evaluations as one 2B call) and the new momentum."""
        d_c, d_u = eval_branches(denoise, x, ctx.sigma, (cond, uncond))
        y_c = to_space(self.space, d_c, x, ctx.sigma)
        delta = y_c - to_space(self.space, d_u, x, ctx.sigma)
        beta = per_sample(self.beta, x)
        if ctx.substep == 0:
            delta = delta + beta * state.m
            state = APGState(m=delta, prev=state.m)
        else:
            delta = delta + beta * state.prev
        if self.r is not None:
            norm = jnp.sqrt(sum_per_sample(delta**2, self.axes) + self.eps)
            r = per_sample(self.r, x)
            # r = 0 means "no clip" (reference code), never "no guidance"; r may be [B].
            delta = delta * jnp.where(r > 0, jnp.minimum(1.0, r / norm), 1.0)
        norm2_c = sum_per_sample(y_c**2, self.axes) + self.eps
        coef = sum_per_sample(delta * y_c, self.axes) / norm2_c
        parallel = coef * y_c
        eta = per_sample(self.eta, x)
        # delta_perp + eta delta_par, written so that eta = 1 gives delta exactly.
        update = delta - (1.0 - eta) * parallel
        y = y_c + (per_sample(self.scale, x) - 1.0) * update
        return GuideOut(x0=from_space(self.space, y, x, ctx.sigma), nfe=2), state


def _axis(a: Any) -> int:
    # Axis 0 is the batch: a norm over it would make samples depend on one another.
    if isinstance(a, bool) or not isinstance(a, int | np.integer) or a == 0:
        raise InvalidArgumentError(
            f"apg: axes must be non-batch axis indices (ints other than 0), got {a!r}; pass "
            "e.g. axes=(1, 2, 3), or axes=None for all non-batch axes"
        )
    return int(a)


def apg(
    scale: ArrayLike = 2.0,
    eta: ArrayLike = 0.0,
    beta: ArrayLike = -0.5,
    r: ArrayLike | None = 2.5,
    space: str = "x0",
    axes: tuple[int, ...] | None = None,
) -> APG:
    """Adaptive projected guidance (see :class:`APG` for the equations and momentum rule).

    Defaults: ``eta = 0`` and ``beta = -0.5`` as in the paper; ``r`` is model dependent
    (15 for SDXL, about 2.5 for EDM2-size pixel/latent models), 2.5 here; x0 space.
    ``eta = 1, beta = 0, r = None`` (or 0) reproduces CFG. Costs 2 evaluations per call.

    Reference: S. Sadat, O. Hilliges, R. M. Weber, "Eliminating Oversaturation and
    Artifacts of High Guidance Scales in Diffusion Models", ICLR 2025 (Algorithm 1).

    Args:
        scale: ``w`` (1 = no guidance).
        eta: parallel-component weight.
        beta: momentum in ``(-1, 1)`` (negative = reverse momentum; ``|beta| >= 1`` would
            make the running average diverge).
        r: norm threshold ``>= 0``; None, 0 or ``inf`` for none.
        space: ``"x0"``, ``"eps"``, ``"v"`` or ``"flow"``.
        axes: axes of norms/projections (None = all non-batch axes; an int is one axis).

    Raises:
        InvalidArgumentError: for a non-finite ``scale``/``eta``, ``beta`` outside
            ``(-1, 1)``, a negative or NaN ``r``, an unknown space or a bad axis.
    """
    check_number("apg", "scale", scale)
    check_number("apg", "eta", eta, example=0.0)
    check_number("apg", "beta", beta, low=-1, high=1, open_low=True, open_high=True, example=-0.5)
    check_number("apg", "r", r, low=0.0, allow_inf=True, example=2.5, none_ok=True)
    if axes is not None:
        axes = tuple(_axis(a) for a in ((axes,) if isinstance(axes, int) else axes))
    return APG(scale=scale, eta=eta, beta=beta, r=r, space=check_space(space), axes=axes)
