"""CFG-Zero* (Fan et al., arXiv 2503.18886): optimized scale and zero-init, in flow velocity."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance.base import GuideOut, State, eval_branches, per_sample
from jaxdiff.guidance.checks import check_count, check_number
from jaxdiff.guidance.spaces import check_space, from_space, sum_per_sample, to_space
from jaxdiff.guidance.switch import cond_guidance


@flax.struct.dataclass
class CFGZeroStar:
    """CFG on ``s* v_u`` instead of ``v_u``, and a zero output for the first steps.

    In ``space`` (rectified-flow velocity ``v = eps - x0`` by default), per sample::

        s* = <v_c, v_u> / ||v_u||^2
        v  = s* v_u + w (v_c - s* v_u)

    ``w = 1`` gives ``v_c`` for any ``s*``; ``use_zero_star=False`` (``s* = 1``) is CFG.

    **Zero-init**: for steps ``i < zero_init_steps`` the output is 0 *in ``space``*, and
    the network is not called (``nfe = 0`` for those steps; a ``lax.cond`` on the step
    index). For the flow velocity, ``v = 0`` means ``x0 = x / (1 + sigma)``, i.e. the
    estimate equals the rectified-flow state ``x_t = x / (1 + sigma)``. The flow state then
    does not move: an Euler/DDIM step in sigma space maps ``x`` to
    ``x (1 + sigma_next) / (1 + sigma)``, so ``x_t`` is unchanged while ``t`` decreases. (It is
    *not* ``dx/dsigma = 0``; that is zero-init in ``space="eps"``, where ``x0 = x``.)

    Attributes:
        scale: ``w`` (scalar or ``[B]``).
        zero_init_steps: static; number of leading steps with zero output.
        use_zero_star: static; use ``s*`` (True) or 1 (False).
        space: static; ``"flow"`` (paper) or another space of
            :mod:`jaxdiff.guidance.spaces`.
        eps: static; guard added to ``||v_u||^2``.
    """

    scale: ArrayLike = 2.0
    zero_init_steps: int = flax.struct.field(pytree_node=False, default=1)
    use_zero_star: bool = flax.struct.field(pytree_node=False, default=True)
    space: str = flax.struct.field(pytree_node=False, default="flow")
    eps: float = flax.struct.field(pytree_node=False, default=1e-8)

    def init(self, x_shape: tuple[int, ...], dtype: Any) -> State:
        """No state."""
        return ()

    def __call__(self, denoise, x: jax.Array, ctx, cond, uncond, state):
        """Returns the CFG-Zero* x0 estimate: 2 evaluations, 0 during zero-init."""

        def guided():
            d_c, d_u = eval_branches(denoise, x, ctx.sigma, (cond, uncond))
            v_c = to_space(self.space, d_c, x, ctx.sigma)
            v_u = to_space(self.space, d_u, x, ctx.sigma)
            if self.use_zero_star:
                s = sum_per_sample(v_c * v_u) / (sum_per_sample(v_u * v_u) + self.eps)
            else:
                s = jnp.ones((x.shape[0],) + (1,) * (x.ndim - 1), v_u.dtype)
            base = s * v_u
            v = base + per_sample(self.scale, x) * (v_c - base)
            x0 = from_space(self.space, v, x, ctx.sigma)
            return GuideOut(x0=x0, nfe=2, aux={"s_star": s.reshape(x.shape[0])}), state

        def zero():
            x0 = from_space(self.space, jnp.zeros_like(x), x, ctx.sigma)
            return GuideOut(x0=x0, nfe=0), state

        if self.zero_init_steps <= 0:
            return guided()
        return cond_guidance(ctx.i < self.zero_init_steps, zero, guided)


def cfg_zero_star(
    scale: ArrayLike = 2.0,
    zero_init_steps: int = 1,
    use_zero_star: bool = True,
    space: str = "flow",
) -> CFGZeroStar:
    """CFG-Zero*: optimized-scale CFG with zero-init; see :class:`CFGZeroStar`.

    Defaults: zero-init of 1 step (diffusers' default; the paper suggests about the first
    4% of steps), flow-velocity space (the method is defined for flow-matching models).

    Reference: W. Fan et al., "CFG-Zero*: Improved Classifier-Free Guidance for Flow
    Matching Models", arXiv 2503.18886 (2025); diffusers ``ClassifierFreeZeroStarGuidance``.

    Args:
        scale: ``w``.
        zero_init_steps: leading steps with zero velocity (and no network call).
        use_zero_star: scale ``v_u`` by ``s*``.
        space: space of the projection and of the zero output.

    Raises:
        InvalidArgumentError: for a non-finite ``scale``, a negative or fractional
            ``zero_init_steps``, a non-bool ``use_zero_star`` or an unknown space.
    """
    check_number("cfg_zero_star", "scale", scale)
    if not isinstance(use_zero_star, bool | np.bool_):
        raise InvalidArgumentError(
            f"cfg_zero_star: use_zero_star must be true or false, got {use_zero_star!r}"
        )
    return CFGZeroStar(
        scale=scale,
        zero_init_steps=check_count("cfg_zero_star", "zero_init_steps", zero_init_steps),
        use_zero_star=bool(use_zero_star),
        space=check_space(space),
    )
