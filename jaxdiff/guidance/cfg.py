"""Classifier-free guidance (Ho & Salimans 2022), in jaxdiff's lerp convention."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
from jax.typing import ArrayLike

from jaxdiff.guidance.base import GuideOut, State, eval_branches, per_sample
from jaxdiff.guidance.checks import check_number


@flax.struct.dataclass
class CFG:
    """Classifier-free guidance ``D_w = D_u + w (D_c - D_u)``.

    ``w = 1`` returns the conditional denoiser, ``w = 0`` the unconditional one. The
    conditional and unconditional branches run as one ``2B`` batch and count 2 network
    evaluations. Because CFG is an affine combination with weights summing to one, it is
    the same whether combined in x0, epsilon, v or score space.

    Attributes:
        scale: ``w``, a scalar or a per-sample ``[B]`` array (a pytree leaf, so a sweep of
            scales shares one compiled sampler).
    """

    scale: ArrayLike = 2.0

    def init(self, x_shape: tuple[int, ...], dtype: Any) -> State:
        """No state."""
        return ()

    def __call__(self, denoise, x: jax.Array, ctx, cond, uncond, state):
        """Returns the guided x0 estimate; see the class docstring."""
        d_c, d_u = eval_branches(denoise, x, ctx.sigma, (cond, uncond))
        x0 = d_u + per_sample(self.scale, x) * (d_c - d_u)
        return GuideOut(x0=x0, nfe=2), state


def cfg(scale: ArrayLike = 2.0) -> CFG:
    """Classifier-free guidance with scale ``w`` (1 = no guidance); see :class:`CFG`.

    Raises:
        InvalidArgumentError: for a NaN or infinite concrete ``scale``.
    """
    check_number("cfg", "scale", scale)
    return CFG(scale=scale)
