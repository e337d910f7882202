"""Autoguidance (Karras et al., NeurIPS 2024): guide a model with a weaker version of itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
from jax.typing import ArrayLike

from jaxdiff.diffusion.formulation import Cond
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance.base import GuideOut, State, batch_sigma, per_sample
from jaxdiff.guidance.checks import check_number, require_callable


@flax.struct.dataclass
class Autoguidance:
    """``D = D_bad + w (D_main - D_bad)``, both conditional.

    ``D_main`` is the sampler's denoiser, ``D_bad`` the guiding model's (a smaller and/or
    less-trained network with the same conditioning, its own EMA). The two have different
    weights, so they are two separate calls (no 2B concatenation): 2 evaluations per call,
    although the guiding model is usually much cheaper.

    Attributes:
        scale: ``w`` (scalar or ``[B]``); 1 = the main model alone.
        guide_denoise: static; the guiding model's ``denoise(x, sigma, cond) -> x0``
            (e.g. ``jaxdiff.generate.model_denoiser(small_model, formulation, params)``).
    """

    scale: ArrayLike = 2.0
    guide_denoise: Callable[..., jax.Array] | None = flax.struct.field(
        pytree_node=False, default=None
    )

    def init(self, x_shape: tuple[int, ...], dtype: Any) -> State:
        """No state."""
        return ()

    def combine(self, x: jax.Array, sigma: jax.Array, cond: Cond, d_main: jax.Array) -> jax.Array:
        """Evaluates the guiding model and returns ``D_bad + w (d_main - D_bad)``.

        Used by compositions (e.g. GFCG) that already hold the main model's output.

        Raises:
            InvalidArgumentError: when no guiding model was given.
        """
        if self.guide_denoise is None:
            raise InvalidArgumentError(
                "autoguidance needs guide_denoise=<the weaker model's denoiser>, got None: "
                "build it with autoguidance(scale, guide_denoise=...) (from the command line: "
                "guide=WORKDIR)"
            )
        d_bad = self.guide_denoise(x, batch_sigma(sigma, x), cond)
        return d_bad + per_sample(self.scale, x) * (d_main - d_bad)

    def __call__(self, denoise, x: jax.Array, ctx, cond, uncond, state):
        """Returns the autoguided x0 estimate (2 evaluations: main and guiding model)."""
        del uncond
        d_main = denoise(x, batch_sigma(ctx.sigma, x), cond)
        return GuideOut(x0=self.combine(x, ctx.sigma, cond, d_main), nfe=2), state


def autoguidance(
    scale: ArrayLike = 2.0, *, guide_denoise: Callable[..., jax.Array]
) -> Autoguidance:
    """Autoguidance with scale ``w`` and guiding model ``guide_denoise``; see :class:`Autoguidance`.

    ``D = D_bad + w (D_main - D_bad)``. EDM2's presets use ``w`` = 2.05 (XXL guided by M),
    2.10 (S by XS) and 1.70 (ImageNet-64 S by XS); 2.0 here.

    Reference: T. Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself",
    NeurIPS 2024 (``NVlabs/edm2``).

    Args:
        scale: ``w`` (1 = no guidance).
        guide_denoise: the guiding (bad) model's denoiser ``(x, sigma, cond) -> x0``
            (required, keyword only).

    Raises:
        InvalidArgumentError: for a non-finite ``scale`` or a ``guide_denoise`` that is not
            callable.
    """
    check_number("autoguidance", "scale", scale)
    require_callable("autoguidance", "guide_denoise", guide_denoise, "the weaker model's denoiser")
    return Autoguidance(scale=scale, guide_denoise=guide_denoise)
