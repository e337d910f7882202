"""Re-noising sampling: denoise to ``x0``, then add fresh noise at the next level.

Step ``i`` of ``sigmas = [s_0, ..., s_{K-1}, 0]`` is::

    x0 = D(x, s_i)
    x  = x0 + s_{i+1} z        # z fresh unit noise; the last step (s_K = 0) returns x0

This is how a few-step distilled student samples (DMD2's backward simulation trains it on
exactly these inputs, see :func:`jaxdiff.distill.few_step.few_step_sample`) and it is
multistep consistency sampling with ``sigma_min = 0``. Nothing of ``x`` is kept from one
step to the next except through ``x0``, so it is an ancestral step with all of the next
level's noise fresh. NFE = K.
"""

from __future__ import annotations

import dataclasses

from jaxdiff.samplers.base import Solver, normal_like


@dataclasses.dataclass(frozen=True)
class Renoise(Solver):
    """``x0 = D(x, s_i)``, then ``x = x0 + s_{i+1} z`` with fresh noise ``z``.

    Sample ``b`` draws step ``i``'s noise from the driver's per-sample step keys (the same
    ``keys[b]`` as its start noise), so its result does not depend on the batch or the
    device count. The last step, to ``s_K = 0``, returns ``x0`` itself. It keeps no noise
    direction of ``x``, so it has no use for CFG++'s separate re-noising estimate.
    """

    stochastic = True

    def step(self, den, x, i, sigmas, state, ev, key):
        """See :class:`Solver`."""
        out, ev = den(x, sigmas[i], ev)
        return out.x0 + sigmas[i + 1] * normal_like(key, x), state, ev


def renoise() -> Renoise:
    """Returns the re-noising solver of few-step students (needs ``key=``)."""
    return Renoise()
