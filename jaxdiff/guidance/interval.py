"""Guidance interval (Kynkäänniemi et al., NeurIPS 2024) and the ``within_interval`` combinator."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance.base import GuideOut, State, batch_sigma
from jaxdiff.guidance.cfg import CFG
from jaxdiff.guidance.checks import check_number, concrete
from jaxdiff.guidance.switch import cond_guidance


@flax.struct.dataclass
class Interval:
    """Applies a guidance only for noise levels in ``(sigma_lo, sigma_hi]``.

    Inside the window the result is the inner guidance ``g`` (for :func:`interval`, CFG
    ``D_u + w (D_c - D_u)``); outside it is the conditional denoiser ``D_c``, one network
    evaluation. The choice is a ``lax.cond`` on a scalar predicate inside the sampler's
    scan, so outside the window the inner guidance (and its unconditional evaluation) is
    really skipped; ``nfe`` is then a traced count (e.g. 2 inside, 1 outside).

    **Per-step decision** (``per_step=True``, the default, as in the reference code): the
    window is tested on the noise level of a step's first evaluation, and a corrector
    evaluation of the same step (Heun's at ``sigma_next``) follows that decision. This
    matches ``kynkaat/guidance-interval``, whose interval is a range of step indices.
    With ``per_step=False`` every evaluation tests its own noise level.

    The inner guidance's state (e.g. APG momentum) is carried through unchanged outside
    the window, so a stateful guidance only evolves on the steps where it is applied.

    Attributes:
        inner: the guidance applied inside the window.
        sigma_lo: lower end (exclusive) of the window; a leaf (traced comparisons only).
        sigma_hi: upper end (inclusive) of the window.
        per_step: static; decide once per step (True) or per evaluation (False).
    """

    inner: Any
    sigma_lo: ArrayLike = 0.28
    sigma_hi: ArrayLike = 1.61
    per_step: bool = flax.struct.field(pytree_node=False, default=True)

    def init(self, x_shape: tuple[int, ...], dtype: Any) -> State:
        """The inner state and the current step's in-window flag."""
        return (self.inner.init(x_shape, dtype), jnp.zeros((), bool))

    def __call__(self, denoise, x: jax.Array, ctx, cond, uncond, state):
        """Returns ``inner`` inside the window and ``D_c`` outside; see the class docstring."""
        inner_state, on = state
        if ctx.substep == 0 or not self.per_step:
            on = (ctx.sigma > self.sigma_lo) & (ctx.sigma <= self.sigma_hi)

        def guided():
            out, new_state = self.inner(denoise, x, ctx, cond, uncond, inner_state)
            return out, (new_state, on)

        def cond_only():
            x0 = denoise(x, batch_sigma(ctx.sigma, x), cond)
            return GuideOut(x0=x0, nfe=1), (inner_state, on)

        return cond_guidance(on, guided, cond_only)


def _check_window(what: str, sigma_lo: ArrayLike, sigma_hi: ArrayLike) -> None:
    check_number(what, "sigma_lo", sigma_lo, low=0.0, example=0.28)
    check_number(what, "sigma_hi", sigma_hi, low=0.0, allow_inf=True, example=1.61)
    lo, hi = concrete(what, "sigma_lo", sigma_lo), concrete(what, "sigma_hi", sigma_hi)
    if lo is not None and hi is not None and not np.all(lo < hi):
        raise InvalidArgumentError(
            f"{what}: the window (sigma_lo, sigma_hi] is empty, got sigma_lo={sigma_lo!r} >= "
            f"sigma_hi={sigma_hi!r}; pass sigma_lo < sigma_hi, e.g. sigma_lo=0.28,sigma_hi=1.61"
        )


def within_interval(
    guidance: Any, sigma_lo: ArrayLike = 0.28, sigma_hi: ArrayLike = 1.61, per_step: bool = True
) -> Interval:
    """Applies any guidance only for ``sigma`` in ``(sigma_lo, sigma_hi]``; ``D_c`` elsewhere.

    E.g. ``within_interval(apg(3.0), 0.3, 5.0)`` is APG inside the window and the
    conditional denoiser outside it. See :class:`Interval`.

    Raises:
        InvalidArgumentError: for a negative or NaN bound or ``sigma_lo >= sigma_hi``
            (``sigma_hi`` may be ``inf``).
    """
    _check_window("within_interval", sigma_lo, sigma_hi)
    return Interval(inner=guidance, sigma_lo=sigma_lo, sigma_hi=sigma_hi, per_step=per_step)


def interval(
    scale: ArrayLike = 2.0,
    sigma_lo: ArrayLike = 0.28,
    sigma_hi: ArrayLike = 1.61,
    per_step: bool = True,
) -> Interval:
    """Guidance interval: CFG for ``sigma`` in ``(sigma_lo, sigma_hi]``, ``D_c`` elsewhere.

    ``D = D_u + w (D_c - D_u)`` if ``sigma_lo < sigma <= sigma_hi`` else ``D_c``. Costs 2
    evaluations inside the window and 1 outside (the unconditional call is skipped).

    The defaults ``(0.28, 1.61]`` reproduce the reference README's ``--guidance_interval=
    "[17, 22]"`` on EDM2's schedule (32 steps, rho = 7, sigma in [0.002, 80]):
    sigma_17 = 1.6086 and sigma_22 = 0.2830 are the first and last guided steps. (The
    README uses ``--guidance_scale=2.0`` with an XS unconditional net; here the
    unconditional branch is the model's own null class.) REPA's ``guidance_high=0.7`` in
    flow time is ``sigma_hi = 0.7 / 0.3 = 2.333`` with ``sigma_lo = 0``.

    Reference: T. Kynkäänniemi et al., "Applying Guidance in a Limited Interval Improves
    Sample and Distribution Quality in Diffusion Models", NeurIPS 2024
    (``kynkaat/guidance-interval``).

    Args:
        scale: CFG scale ``w`` (scalar or per-sample ``[B]``).
        sigma_lo: exclusive lower end of the window.
        sigma_hi: inclusive upper end of the window.
        per_step: decide once per solver step (reference behaviour) or per evaluation.

    Raises:
        InvalidArgumentError: for a non-finite ``scale``, a negative or NaN bound, or
            ``sigma_lo >= sigma_hi``.
    """
    check_number("interval", "scale", scale)
    _check_window("interval", sigma_lo, sigma_hi)
    return Interval(inner=CFG(scale=scale), sigma_lo=sigma_lo, sigma_hi=sigma_hi, per_step=per_step)


def interval_from_steps(sigmas: ArrayLike, first: int, last: int) -> tuple[float, float]:
    """Converts an inclusive step range (the reference code's form) to ``(sigma_lo, sigma_hi)``.

    Steps ``first..last`` of a strictly decreasing schedule ``sigmas`` are exactly those
    with ``sigma_lo < sigmas[i] <= sigma_hi`` for the returned window. Done in float32 to
    match the comparison inside the sampler.

    Args:
        sigmas: the ``[N + 1]`` schedule.
        first: first guided step index.
        last: last guided step index (``< N``).

    Raises:
        InvalidArgumentError: unless ``0 <= first <= last < N``.
    """
    s = np.asarray(sigmas, np.float32)
    if not 0 <= first <= last < s.shape[0] - 1:
        raise InvalidArgumentError(
            f"need 0 <= first <= last < {s.shape[0] - 1} (the number of steps), got "
            f"first={first}, last={last}: pass an inclusive range of step indices"
        )
    return float(s[last + 1]), float(s[first])
