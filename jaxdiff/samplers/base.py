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
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance.base import GuideOut
from jaxdiff.utils.rng import per_sample_keys, start_noise


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
        stochastic: whether ``step`` draws noise, so ``sample`` needs a ``key``; a class
            flag, or a property where a hyperparameter of 0 turns the noise off.
        honours_renoise: class flag; the step uses ``GuideOut.x0_renoise`` (CFG++'s
            separate re-noising estimate). The driver refuses guidance that sets it with a
            solver that would silently drop it.
    """

    stochastic: ClassVar[bool] = False
    honours_renoise: ClassVar[bool] = False

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
            x: current state ``[B, ...]`` at noise level ``sigmas[i]`` (float32, or float64
                when the noise is float64; ``sigmas`` has the same dtype).
            i: int32 step index (traced).
            sigmas: the whole ``[N + 1]`` schedule.
            state: the solver state.
            ev: evaluation state to thread through ``den``.
            key: per-sample PRNG keys ``[B]`` for this step.

        Returns:
            ``(x_next, state, ev)``.
        """


def check_hyper(
    solver: str, name: str, value: float, low: float = 0.0, low_name: str | None = None
) -> None:
    """Checks a solver hyperparameter is a number ``>= low`` (``inf`` allowed, NaN not).

    Args:
        solver: the solver's name, for the message.
        name: the hyperparameter's name.
        value: its value (a static Python number).
        low: the smallest valid value.
        low_name: what ``low`` is, when it is another hyperparameter (e.g. ``"s_tmin"``).

    Raises:
        InvalidArgumentError: naming the solver, the value and the valid range.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number >= low:  # also catches NaN and non-numbers
        bound = f"{low_name} = {low:g}" if low_name else f"{low:g}"
        raise InvalidArgumentError(
            f"{solver}: {name} must be a number >= {bound}, got {value!r}; "
            f"pass e.g. {name}={max(low, 0.0):g}"
        )


def normal_like(keys: jax.Array, x: jax.Array) -> jax.Array:
    """Draws standard normal noise shaped like ``x``, sample ``b`` from ``keys[b]``.

    Per-sample keys make every sample independent of the batch it is drawn in.
    """
    return start_noise(keys, x.shape[1:], x.dtype)


def batch_keys(key: jax.Array | None, batch: int) -> jax.Array:
    """Returns ``[batch]`` per-sample keys: ``fold_in(key, b)`` for a single key.

    Args:
        key: a single PRNG key (typed or raw ``uint32[2]``) or ``[batch]`` keys already
            per sample (e.g. folded with global sample indices), or None (key 0).
        batch: the batch size.

    Raises:
        InvalidArgumentError: if ``key`` holds a number of keys other than 1 or ``batch``.
    """
    if key is None:
        key = jax.random.key(0)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return per_sample_keys(key, batch)
    if key.shape == (batch,):
        return key
    raise InvalidArgumentError(
        f"key must be one PRNG key or {batch} per-sample keys, got key shape {key.shape}: "
        f"pass jax.random.key(seed) or keys of shape ({batch},)"
    )


def step_keys(keys: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits per-sample keys for step ``i`` into (solver keys, guidance keys)."""
    both = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, i)))(keys)
    return both[:, 0], both[:, 1]


def per_sample_normal(
    key: jax.Array | None, shape: tuple[int, ...], dtype: Any = jnp.float32
) -> jax.Array:
    """Initial noise ``[B, *shape[1:]]`` with sample ``b`` drawn from ``fold_in(key, b)``.

    The same ``key`` gives the same first images at any batch size (``key`` may also be
    ``[B]`` per-sample keys, see :func:`batch_keys`).
    """
    return start_noise(batch_keys(key, shape[0]), tuple(shape[1:]), dtype)
