"""The Solver interface and the helpers every solver shares.

A solver is an ``init/step`` pair with a fixed-shape state (multistep history lives in the
state), so one ``lax.scan`` drives every solver. A step receives ``den``, the guided
denoiser the driver builds for that step::

    out, ev = den(x, sigma, ev, substep=0)   # out.x0: guided estimate of x0

``ev`` is an opaque :class:`EvalState` (guidance state and the network-evaluation count)
that the solver threads through every call and returns. Threading it explicitly keeps the
step pure, so solvers may call ``den`` inside ``lax.cond`` (Heun skips its corrector on the
last step that way, which is how 18 Heun steps cost 35 evaluations, not 36).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.guidance.base import GuideOut


class EvalState(NamedTuple):
    """State threaded through every denoiser evaluation of a sampling run.

    Attributes:
        guidance: the guidance method's state pytree.
        nfe: int32 number of network evaluations so far (per sample).
    """

    guidance: Any
    nfe: jax.Array


DenFn = Callable[..., tuple[GuideOut, EvalState]]
"""``den(x, sigma, ev, substep=0) -> (GuideOut, ev)``: the guided denoiser of one step."""


class Solver(abc.ABC):
    """One numerical method for the probability-flow ODE or the reverse SDE.

    Attributes:
        stochastic: class-level flag; stochastic solvers need a ``key`` in ``sample``.
    """

    stochastic: ClassVar[bool] = False

    def init(self, x: jax.Array, sigmas: jax.Array) -> Any:
        """Returns the initial fixed-shape solver state (default: none)."""
        del x, sigmas
        return ()

    @abc.abstractmethod
    def step(
        self,
        den: DenFn,
        x: jax.Array,
        i: jax.Array,
        sigmas: jax.Array,
        state: Any,
        ev: EvalState,
        key: jax.Array,
    ) -> tuple[jax.Array, Any, EvalState]:
        """Advances ``x`` from ``sigmas[i]`` to ``sigmas[i + 1]``.

        Args:
            den: the guided denoiser for this step (see the module docstring).
            x: current state ``[B, ...]`` (float32), at noise level ``sigmas[i]``.
            i: int32 step index (traced).
            sigmas: the whole ``[N + 1]`` schedule.
            state: the solver state.
            ev: evaluation state to thread through ``den``.
            key: per-sample PRNG keys ``[B]`` for this step.

        Returns:
            ``(x_next, state, ev)``.
        """


def normal_like(keys: jax.Array, x: jax.Array) -> jax.Array:
    """Draws standard normal noise shaped like ``x``, sample ``b`` from ``keys[b]``.

    Per-sample keys make every sample independent of the batch it is drawn in.
    """
    return jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(keys)


def sample_keys(key: jax.Array | None, batch: int) -> jax.Array:
    """Returns ``[batch]`` per-sample keys: ``fold_in(key, b)`` for a single key.

    Args:
        key: a single PRNG key (typed or raw ``uint32[2]``) or ``[batch]`` keys already
            per sample (e.g. folded with global sample indices), or None (key 0).
        batch: the batch size.

    Raises:
        ValueError: if ``key`` holds a number of keys other than 1 or ``batch``.
    """
    if key is None:
        key = jax.random.key(0)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))
    if key.shape == (batch,):
        return key
    raise ValueError(
        f"key must be one PRNG key or {batch} per-sample keys, got key shape {key.shape}"
    )


def step_keys(keys: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits per-sample keys for step ``i`` into (solver keys, guidance keys)."""
    both = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, i)))(keys)
    return both[:, 0], both[:, 1]


def per_sample_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Initial noise ``[B, *shape[1:]]`` with sample ``b`` drawn from ``fold_in(key, b)``.

    The same ``key`` gives the same first images at any batch size.
    """
    keys = sample_keys(key, shape[0])
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)
