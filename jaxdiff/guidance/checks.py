"""Argument checks shared by the guidance factories.

Every bad argument raises :class:`~jaxdiff.errors.InvalidArgumentError` with a message that
names the method, the argument, the offending value and the fix. Values are checked when
they are known now: Python and NumPy scalars and arrays, and concrete JAX arrays. Traced
values (a factory called inside ``jit``, e.g. for a sweep of scales) cannot be inspected
and are left alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import InvalidArgumentError


def concrete(what: str, name: str, value: Any) -> np.ndarray | None:
    """Returns ``value`` as a NumPy array if it is known now, None if it is traced.

    Raises:
        InvalidArgumentError: if ``value`` is known but not numeric (e.g. a string from a
            ``--guidance`` spec such as ``"cfg:high"``).
    """
    if value is None or isinstance(value, jax.core.Tracer):
        return None
    try:
        arr = np.asarray(value)
    except Exception:  # e.g. an array sharded over several hosts: not inspectable here
        return None
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise InvalidArgumentError(
            f"{what}: {name} must be a number or a per-sample array of numbers, got "
            f"{value!r}; pass e.g. {name}=2.0"
        )
    return arr


def _shown(value: Any, arr: np.ndarray, bad: np.ndarray) -> str:
    if arr.ndim == 0:
        return repr(value)
    count, first = int(bad.sum()), arr[bad].flat[0].item()
    return f"an array with {count} bad {'entry' if count == 1 else 'entries'}, e.g. {first!r}"


def check_number(
    what: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    allow_inf: bool = False,
    example: str | float = 2.0,
    none_ok: bool = False,
) -> None:
    """Checks a scale-like argument (scalar or per-sample array) when it is concrete.

    Args:
        what: the method, e.g. ``"apg"``.
        name: the argument, e.g. ``"r"``.
        value: its value.
        low: smallest valid value (``> low`` with ``open_low``), or None for no bound.
        high: largest valid value, or None.
        open_low: exclude ``low`` itself.
        open_high: exclude ``high`` itself.
        allow_inf: accept ``inf`` (NaN is always refused).
        example: a valid value for the message's fix.
        none_ok: accept None (an optional argument switched off).

    Raises:
        InvalidArgumentError: for a NaN, an infinity (unless allowed), a value out of
            range, a non-number, or a None that is not allowed.
    """
    if value is None:
        if none_ok:
            return
        raise InvalidArgumentError(f"{what}: {name} must be a number, got None; pass {name}=...")
    arr = concrete(what, name, value)
    if arr is None:
        return
    with np.errstate(invalid="ignore"):
        bad = np.isnan(arr) if allow_inf else ~np.isfinite(arr)
        if low is not None:
            bad |= (arr <= low) if open_low else (arr < low)
        if high is not None:
            bad |= (arr >= high) if open_high else (arr > high)
    if bad.any():
        parts = ["finite" if not allow_inf else "not NaN"]
        if low is not None:
            parts.append(f"{'>' if open_low else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if open_high else '<='} {high:g}")
        raise InvalidArgumentError(
            f"{what}: {name} must be a number ({', '.join(parts)}), got "
            f"{_shown(value, arr, bad)}; pass e.g. {name}={example}"
        )


def check_count(what: str, name: str, value: Any, example: int = 1) -> int:
    """Returns ``value`` as an int if it is a whole number ``>= 0`` (a static count).

    Raises:
        InvalidArgumentError: for a negative, fractional or non-numeric value.
    """
    try:
        count = int(value)
        whole = count == value and not isinstance(value, bool)
    except (TypeError, ValueError):
        whole = False
    if not whole or count < 0:
        raise InvalidArgumentError(
            f"{what}: {name} must be a whole number >= 0, got {value!r}; pass e.g. {name}={example}"
        )
    return count


def check_choice(what: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Returns ``value`` if it is one of ``choices``.

    Raises:
        InvalidArgumentError: naming the value and the choices.
    """
    if value not in choices:
        raise InvalidArgumentError(
            f"{what}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )
    return value


def require_callable(what: str, name: str, fn: Any, meaning: str) -> None:
    """Checks a required Python callable (a guiding model, a classifier) was given.

    Args:
        what: the method.
        name: the keyword argument, e.g. ``"log_prob_fn"``.
        fn: its value.
        meaning: what the callable is, e.g. ``"a noise-aware classifier (x, sigma, y) -> [B]"``.

    Raises:
        InvalidArgumentError: if ``fn`` is None or not callable.
    """
    if not callable(fn):
        raise InvalidArgumentError(
            f"{what} needs {name}=<{meaning}>, got {fn!r}: pass the callable as {name}=..."
        )


def check_target(what: str, target: Any) -> None:
    """Checks a concrete class ``target`` is a whole number (or array of them) ``>= 0``.

    Raises:
        InvalidArgumentError: for a negative, fractional or non-numeric class.
    """
    arr = concrete(what, "target", target)
    if arr is None:
        return
    if not np.issubdtype(arr.dtype, np.integer):
        with np.errstate(invalid="ignore"):
            whole = np.isfinite(arr) & (arr == np.round(arr))
    else:
        whole = np.ones(arr.shape, bool)
    bad = ~whole | (arr < 0)
    if bad.any():
        raise InvalidArgumentError(
            f"{what}: target must be a class index >= 0 (int or [B] ints), got "
            f"{_shown(target, arr, bad)}; pass e.g. target=0, or target=None to use cond="
        )


def _describe(cond: Any) -> str:
    if cond is None:
        return "None"
    if hasattr(cond, "dtype") and hasattr(cond, "shape"):
        return f"a {cond.dtype} array of shape {tuple(cond.shape)}"
    return f"a {type(cond).__name__}"


def int_labels(what: str, cond: Any, x: jax.Array, alternative: str = "") -> jax.Array:
    """Returns ``cond`` if it holds integer class labels ``[B]``; checked while tracing.

    Args:
        what: the method, e.g. ``"gfcg"``.
        cond: the ``cond`` passed to the sampler.
        x: the ``[B, ...]`` state (for the batch size).
        alternative: another way to give the labels, appended to the fix (e.g.
            ``" or set target="``).

    Raises:
        InvalidArgumentError: if ``cond`` is None, not an integer array, or not ``[B]``.
    """
    ok = (
        hasattr(cond, "dtype")
        and jnp.issubdtype(cond.dtype, jnp.integer)
        and tuple(cond.shape) == tuple(x.shape[:1])
    )
    if not ok:
        raise InvalidArgumentError(
            f"{what} needs integer class labels in cond=, got {_describe(cond)}: pass "
            f"cond=<int labels of shape ({x.shape[0]},)> to sample(){alternative}"
        )
    return cond


__all__ = [
    "check_choice",
    "check_count",
    "check_number",
    "check_target",
    "concrete",
    "int_labels",
    "require_callable",
]
