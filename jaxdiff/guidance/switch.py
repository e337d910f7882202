"""Choosing between two guidance evaluations with ``lax.cond``, so one really is skipped.

Inside the sampler's ``lax.scan`` a ``lax.cond`` on a *scalar* (unbatched) predicate runs
only the taken branch: this is how the guidance interval, Adaptive Guidance, CFG-Zero*'s
zero-init and the PAG/SLG step windows save network evaluations under ``jit``. Both
branches are compiled. Under ``jax.vmap`` with a batched predicate ``cond`` becomes a
``select`` and both branches run (results stay correct, the saving is lost).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff.guidance.base import GuideOut

Branch = Callable[[], tuple[GuideOut, Any]]


def _harmonize(fn: Branch, renoise: bool, aux: dict[str, jax.ShapeDtypeStruct]) -> Branch:
    def run():
        out, state = fn()
        x0_renoise = out.x0_renoise
        if x0_renoise is None and renoise:
            x0_renoise = out.x0
        have = out.aux or {}
        full = {k: have[k] if k in have else jnp.zeros(s.shape, s.dtype) for k, s in aux.items()}
        nfe = jnp.asarray(out.nfe, jnp.int32)
        return GuideOut(out.x0, nfe, x0_renoise, full or None), state

    return run


def cond_guidance(pred: jax.Array | bool, on_fn: Branch, off_fn: Branch) -> tuple[GuideOut, Any]:
    """``lax.cond(pred, on_fn, off_fn)`` for two ``() -> (GuideOut, state)`` branches.

    The outputs are made structurally equal first: ``nfe`` becomes an int32 array (so the
    count is the taken branch's), a missing ``x0_renoise`` becomes ``x0`` when the other
    branch has one, and ``aux`` keys missing on one side are zero-filled. The two states
    must already have the same structure. A Python bool ``pred`` picks a branch statically.

    Args:
        pred: scalar boolean; must not be batched for the saving to be real.
        on_fn: branch taken when ``pred`` is true.
        off_fn: branch taken otherwise.

    Returns:
        The taken branch's ``(GuideOut, state)``.
    """
    if isinstance(pred, bool):
        return on_fn() if pred else off_fn()
    on_shape, off_shape = jax.eval_shape(on_fn), jax.eval_shape(off_fn)
    renoise = on_shape[0].x0_renoise is not None or off_shape[0].x0_renoise is not None
    aux = {**(off_shape[0].aux or {}), **(on_shape[0].aux or {})}
    return jax.lax.cond(
        jnp.asarray(pred), _harmonize(on_fn, renoise, aux), _harmonize(off_fn, renoise, aux)
    )


def step_window(start: float, stop: float, num_steps: int) -> tuple[int, int]:
    """The static step range ``[first, end)`` of a window given as fractions of N steps.

    Step ``i`` is inside when ``start N <= i < stop N`` (as diffusers' PAG/SLG windows).
    """
    return math.ceil(start * num_steps - 1e-9), math.ceil(stop * num_steps - 1e-9)


def in_window(
    start: float, stop: float, i: jax.Array, num_steps: int, on_fn: Branch, off_fn: Branch
) -> tuple[GuideOut, Any]:
    """``on_fn`` inside the step window ``[start N, stop N)``, ``off_fn`` outside it.

    A window covering every step (or none) picks its branch statically, so nothing extra
    is compiled; otherwise :func:`cond_guidance` on the step index skips the other branch.
    """
    first, end = step_window(start, stop, num_steps)
    if first <= 0 and end >= num_steps:
        return on_fn()
    if end <= first:
        return off_fn()
    return cond_guidance((i >= first) & (i < end), on_fn, off_fn)
