"""Negative token merging (NegToMe; Singh et al. 2024) for output diversity, composed with CFG."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance.base import Guidance, NoGuidance, State
from jaxdiff.guidance.cfg import cfg
from jaxdiff.guidance.checks import check_choice, check_number
from jaxdiff.guidance.switch import in_window, step_window
from jaxdiff.models.dit_blocks import MERGE_MODES, TokenMerge


@flax.struct.dataclass
class NegToMe:
    """A base guidance whose network merges each image's tokens away from the others'.

    Inside the step window the base guidance (CFG, or the plain conditional denoiser) is
    evaluated with the network's ``"negtome"`` variant: after attention in every block,
    each token ``x_i`` of an image finds its most cosine-similar token ``r_j`` among the
    other images of the batch (``mode="others"``) or the batch's first image
    (``mode="first"``), and becomes ``(1 + alpha) x_i - alpha r_j`` when the similarity
    exceeds ``tau`` (:func:`jaxdiff.models.dit_blocks.merge_tokens`). Tokens of one
    image are pushed away from the features the other images already have, so a batch
    comes out more diverse. Outside the window the base guidance runs unchanged.

    Batches: a base that evaluates several branches as one ``kB`` call (CFG's
    conditional + unconditional) gets ``groups = k``: each branch's images are merged only
    among themselves, as the reference merges the two CFG halves separately. The
    merge couples the samples of a batch, so results depend on the batch (unlike every
    other jaxdiff guidance) but not on how it is sharded: under ``jit`` the cross-sample
    similarity is one program over the whole batch and XLA gathers what each device
    needs.

    Needs a denoiser built with :func:`jaxdiff.generate.model_denoiser` on a network that
    supports ``variant="negtome"`` and ``merge=`` (jaxdiff's DiT). Costs no extra network
    evaluation; the merge is ``O(n^2 T^2 D)`` per block for ``n`` images of ``T`` tokens.

    **Step window**: merging is on for steps ``i`` with ``start N <= i < stop N``; the
    reference merges for DDPM times ``t`` in ``[900, 1000]`` (about the first 10% of
    sampling). Outside it the merged network is skipped with a ``lax.cond``.

    Attributes:
        base: the guidance evaluated with the merging network (e.g. :class:`.cfg.CFG`).
        alpha: merge strength (scalar or ``[B]``); 0 = the base guidance.
        tau: similarity threshold (scalar).
        start: static; window start as a fraction of the steps.
        stop: static; window end as a fraction of the steps.
        mode: static; ``"others"`` or ``"first"``.
    """

    base: Any = None
    alpha: ArrayLike = 0.9
    tau: ArrayLike = 0.65
    start: float = flax.struct.field(pytree_node=False, default=0.0)
    stop: float = flax.struct.field(pytree_node=False, default=0.1)
    mode: str = flax.struct.field(pytree_node=False, default="others")

    def init(self, x_shape: tuple[int, ...], dtype: Any) -> State:
        """The base guidance's state."""
        return self.base.init(x_shape, dtype)

    def window(self, num_steps: int) -> tuple[int, int]:
        """The static step range ``[first, end)`` where tokens merge, for N steps."""
        return step_window(self.start, self.stop, num_steps)

    def merging(self, denoise, b: int):
        """``denoise`` with the ``"negtome"`` variant for calls on ``k * b`` samples."""
        alpha = jnp.broadcast_to(jnp.asarray(self.alpha, jnp.float32), (b,))

        def merged(x, sigma, cond, **kwargs):
            if "variant" in kwargs:
                raise InvalidArgumentError(
                    f"negtome cannot wrap a base guidance that asks for variant="
                    f"{kwargs['variant']!r} (one network variant per call): use cfg or none"
                )
            if x.shape[0] % b:
                raise InvalidArgumentError(
                    f"negtome: the base guidance called the network on {x.shape[0]} samples, "
                    f"not a multiple of the batch {b}; use a base that evaluates whole batches"
                )
            groups = x.shape[0] // b
            merge = TokenMerge(jnp.tile(alpha, groups), self.tau, groups, self.mode)
            return denoise(x, sigma, cond, variant="negtome", merge=merge, **kwargs)

        return merged

    def __call__(self, denoise, x: jax.Array, ctx, cond, uncond, state):
        """Returns the base guidance's output, with merging inside the window."""

        def on():
            return self.base(self.merging(denoise, x.shape[0]), x, ctx, cond, uncond, state)

        def off():
            return self.base(denoise, x, ctx, cond, uncond, state)

        return in_window(self.start, self.stop, ctx.i, ctx.num_steps, on, off)


def negtome(
    alpha: ArrayLike = 0.9,
    scale: ArrayLike | None = None,
    tau: ArrayLike = 0.65,
    start: float = 0.0,
    stop: float = 0.1,
    mode: str = "others",
    base: Guidance | None = None,
) -> NegToMe:
    """Negative token merging around CFG (``scale=w``) or the conditional denoiser.

    Defaults from the reference (``1jsingh/negtome``, ``NegtomeArgs``): alpha 0.9,
    threshold 0.65, merging for the first ~10% of sampling (DDPM t in [900, 1000]).
    See :class:`NegToMe`.

    Reference: J. Singh et al., "Negative Token Merging: Image-based Adversarial Feature
    Guidance", 2024.

    Args:
        alpha: merge strength ``>= 0`` (scalar or ``[B]``).
        scale: CFG ``w`` of the base guidance, or None for the conditional denoiser.
        tau: cosine-similarity threshold in ``[-1, 1]``.
        start: window start (fraction of steps).
        stop: window end (fraction of steps).
        mode: ``"others"`` (every other image of the batch) or ``"first"`` (the
            batch's first image is the reference and is left unchanged).
        base: a base guidance instead of ``scale`` (e.g. an :func:`.interval.interval` CFG).

    Raises:
        InvalidArgumentError: for a negative or non-finite alpha, a threshold outside
            ``[-1, 1]``, a window outside ``0 <= start <= stop <= 1``, an unknown mode,
            or both ``scale`` and ``base``.
    """
    check_number("negtome", "alpha", alpha, low=0.0, example=0.9)
    check_number("negtome", "tau", tau, low=-1.0, high=1.0, example=0.65)
    check_number("negtome", "scale", scale, none_ok=True)
    for name, value in (("start", start), ("stop", stop)):
        check_number("negtome", name, value, low=0.0, high=1.0, example=0.1)
    if not start <= stop:
        raise InvalidArgumentError(
            f"negtome: the step window needs start <= stop (fractions of the steps in [0, 1]), "
            f"got start={start!r}, stop={stop!r}; pass e.g. start=0,stop=0.1"
        )
    check_choice("negtome", "mode", mode, MERGE_MODES)
    if base is not None and scale is not None:
        raise InvalidArgumentError("negtome: give the CFG scale= or a base= guidance, not both")
    if base is None:
        base = NoGuidance() if scale is None else cfg(scale)
    return NegToMe(base=base, alpha=alpha, tau=tau, start=float(start), stop=float(stop), mode=mode)


__all__ = ["NegToMe", "negtome"]
