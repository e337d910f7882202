"""Perturbed-attention guidance (PAG) and skip-layer guidance (SLG)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
from jax.typing import ArrayLike

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance.base import GuideOut, State, batch_sigma, eval_branches, per_sample
from jaxdiff.guidance.checks import check_number
from jaxdiff.guidance.switch import in_window, step_window


@flax.struct.dataclass
class PerturbedGuidance:
    """``D = D_u + w (D_c - D_u) + s (D_c - D_p)`` with ``D_p`` a perturbed network's output.

    ``D_p = denoise(x, sigma, cond, variant=...)``: the same weights with a static network
    variant, ``"pag"`` (identity attention map in the model's ``pag_layers``) or ``"slg"``
    (the model's ``skip_layers`` skipped). jaxdiff's UNet and DiT support both, the MLP
    only ``"slg"``; build the denoiser with :func:`jaxdiff.generate.model_denoiser`, which
    forwards ``variant=`` to ``model.apply``. A black-box denoiser without ``variant``
    cannot be used.

    The conditional and unconditional branches share one 2B call; the perturbed pass is a
    separate call (a different static network). With ``scale=None`` there is no CFG term:
    ``D = D_c + s (D_c - D_p)``, and no unconditional call.

    **Step window**: the perturbed term is applied for steps ``i`` with
    ``start N <= i < stop N`` (fractions of the N solver steps, as in diffusers); outside
    it the perturbed call is skipped with a ``lax.cond`` on the step index.

    Cost per call: 3 evaluations (2 with ``scale=None``) inside the window, 2 (1) outside.

    Attributes:
        perturb_scale: ``s`` (scalar or ``[B]``); 0 gives CFG (or ``D_c``).
        scale: CFG ``w`` (scalar or ``[B]``) or None for no CFG term.
        variant: static; ``"pag"`` or ``"slg"``.
        start: static; window start as a fraction of the steps.
        stop: static; window end as a fraction of the steps.
    """

    perturb_scale: ArrayLike = 3.0
    scale: ArrayLike | None = None
    variant: str = flax.struct.field(pytree_node=False, default="pag")
    start: float = flax.struct.field(pytree_node=False, default=0.0)
    stop: float = flax.struct.field(pytree_node=False, default=1.0)

    def init(self, x_shape: tuple[int, ...], dtype: Any) -> State:
        """No state."""
        return ()

    def window(self, num_steps: int) -> tuple[int, int]:
        """The static step range ``[first, end)`` of the perturbed term for N steps."""
        return step_window(self.start, self.stop, num_steps)

    def __call__(self, denoise, x: jax.Array, ctx, cond, uncond, state):
        """Returns the guided x0 estimate; see the class docstring."""
        sigma = batch_sigma(ctx.sigma, x)

        def unperturbed():
            if self.scale is None:
                d_c = denoise(x, sigma, cond)
                return d_c, d_c, 1
            d_c, d_u = eval_branches(denoise, x, sigma, (cond, uncond))
            return d_u + per_sample(self.scale, x) * (d_c - d_u), d_c, 2

        def on():
            x0, d_c, nfe = unperturbed()
            d_p = denoise(x, sigma, cond, variant=self.variant)
            x0 = x0 + per_sample(self.perturb_scale, x) * (d_c - d_p)
            return GuideOut(x0=x0, nfe=nfe + 1), state

        def off():
            x0, _, nfe = unperturbed()
            return GuideOut(x0=x0, nfe=nfe), state

        return in_window(self.start, self.stop, ctx.i, ctx.num_steps, on, off)


def _make(variant, perturb_scale, scale, start, stop) -> PerturbedGuidance:
    check_number(variant, f"{variant}_scale", perturb_scale, example=3.0)
    check_number(variant, "scale", scale, none_ok=True)
    for name, value in (("start", start), ("stop", stop)):
        check_number(variant, name, value, low=0.0, high=1.0, example=0.5)
    if not start <= stop:
        raise InvalidArgumentError(
            f"{variant}: the step window needs start <= stop (fractions of the steps in "
            f"[0, 1]), got start={start!r}, stop={stop!r}; pass e.g. start=0.01,stop=0.2"
        )
    return PerturbedGuidance(
        perturb_scale=perturb_scale,
        scale=scale,
        variant=variant,
        start=float(start),
        stop=float(stop),
    )


def pag(
    pag_scale: ArrayLike = 3.0,
    scale: ArrayLike | None = None,
    start: float = 0.0,
    stop: float = 1.0,
) -> PerturbedGuidance:
    """Perturbed-attention guidance: ``D = [CFG or D_c] + s (D_c - D_pag)``.

    Defaults: ``s = 3.0`` (diffusers' PAG pipelines, which perturb the "mid" layers, as
    jaxdiff's UNet does by default), no CFG term, every step. See
    :class:`PerturbedGuidance`.

    Reference: D. Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention
    Guidance", ECCV 2024.

    Args:
        pag_scale: ``s``.
        scale: CFG ``w``, or None for no unconditional branch.
        start: window start (fraction of steps).
        stop: window end (fraction of steps).

    Raises:
        InvalidArgumentError: for a non-finite scale or a window outside
            ``0 <= start <= stop <= 1``.
    """
    return _make("pag", pag_scale, scale, start, stop)


def slg(
    slg_scale: ArrayLike = 2.8,
    scale: ArrayLike | None = None,
    start: float = 0.01,
    stop: float = 0.2,
) -> PerturbedGuidance:
    """Skip-layer guidance: ``D = [CFG or D_c] + s (D_c - D_slg)`` inside a step window.

    Defaults from Stable Diffusion 3.5 Medium: ``s = 2.8``, active from 1% to 20% of the
    steps (SD3.5 skips layers 7-9 and combines with CFG; pass ``scale=`` for the CFG term
    and choose the layers with the model's ``skip_layers``). See
    :class:`PerturbedGuidance`.

    Reference: Stability AI, SD3.5 "Skip Layer Guidance" (diffusers
    ``SkipLayerGuidance``).

    Args:
        slg_scale: ``s``.
        scale: CFG ``w``, or None for no unconditional branch.
        start: window start (fraction of steps).
        stop: window end (fraction of steps).

    Raises:
        InvalidArgumentError: for a non-finite scale or a window outside
            ``0 <= start <= stop <= 1``.
    """
    return _make("slg", slg_scale, scale, start, stop)
