"""Re-noising sampling: denoise to ``x0``, then add fresh noise at the next level.

Step ``i`` of ``sigmas = [s_0, ..., s_{K-1}, 0]`` is::

    x0 = D(x, s_i)
    x  = x0 + s_{i+1} z        # z fresh unit noise; the last step (s_K = 0) returns x0

A consistency student whose boundary is ``sigma_min > 0`` (``f(x, sigma_min) = x``, so its
``x0`` already carries ``sigma_min`` of noise) re-noises with the rest only,
``x = x0 + sqrt(s_{i+1}^2 - sigma_min^2) z`` (Song et al.'s multistep sampling), as
``renoise(sigma_min=...)``.

This is how a few-step distilled student samples (DMD2's backward simulation trains it on
exactly these inputs, see :func:`jaxdiff.distill.few_step.few_step_sample`) and it is
multistep consistency sampling with ``sigma_min = 0``. Nothing of ``x`` is kept from one
step to the next except through ``x0``, so it is an ancestral step with all of the next
level's noise fresh. NFE = K.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.samplers.base import Solver, normal_like


@dataclasses.dataclass(frozen=True)
class Renoise(Solver):
    """``x0 = D(x, s_i)``, then ``x = x0 + s_{i+1} z`` with fresh noise ``z``.

    Sample ``b`` draws step ``i``'s noise from the driver's per-sample step keys (the same
    ``keys[b]`` as its start noise), so its result does not depend on the batch or the
    device count. The last step, to ``s_K = 0``, returns ``x0`` itself. It keeps no noise
    direction of ``x``, so it has no use for CFG++'s separate re-noising estimate.

    Attributes:
        sigma_min: noise ``x0`` already carries (a consistency student's boundary level);
            the re-noising adds ``sqrt(s_{i+1}^2 - sigma_min^2)``. 0 for every other student.
    """

    sigma_min: float = 0.0
    stochastic = True

    def step(self, den, x, i, sigmas, state, ev, key):
        """See :class:`Solver`."""
        out, ev = den(x, sigmas[i], ev)
        nxt = sigmas[i + 1]
        if self.sigma_min:
            # The last step (s_K = 0) still returns x0 itself.
            nxt = jnp.sqrt(jnp.maximum(nxt**2 - self.sigma_min**2, 0.0))
        return out.x0 + nxt * normal_like(key, x), state, ev


def renoise(sigma_min: float = 0.0) -> Renoise:
    """Returns the re-noising solver of few-step students (needs ``key=``).

    Args:
        sigma_min: a consistency student's boundary level (0 for DMD2-style students).

    Raises:
        InvalidArgumentError: for a negative or non-finite ``sigma_min``.
    """
    sigma_min = float(sigma_min)
    if not sigma_min >= 0.0 or sigma_min == float("inf"):
        raise InvalidArgumentError(
            f"renoise: sigma_min={sigma_min} must be a finite level >= 0 (the student's "
            "boundary level, e.g. renoise:sigma_min=0.002)"
        )
    return Renoise(sigma_min=sigma_min)
