"""Train state: params, EMA params at one or more rates, optax state and the step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries between steps (a pytree, checkpointed whole).

    Attributes:
        step: int32 number of optimizer updates done.
        params: the network parameters (unboxed).
        ema: EMA copies of ``params`` keyed by rate, e.g. ``{"0.999": params}``.
        opt_state: the optax state.
    """

    step: jax.Array
    params: Any
    ema: dict[str, Any]
    opt_state: Any


def ema_key(rate: float) -> str:
    """The dictionary key of an EMA rate, e.g. ``0.999 -> "0.999"``."""
    return f"{rate:g}"


def create_train_state(
    params: Any, tx: optax.GradientTransformation, ema_rates: Sequence[float]
) -> TrainState:
    """Builds the initial state: EMA copies start equal to ``params``.

    Raises:
        ValueError: if an EMA rate lies outside [0, 1).
    """
    for rate in ema_rates:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EMA rate must lie in [0, 1), got {rate}")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema={ema_key(r): jax.tree.map(jnp.copy, params) for r in ema_rates},
        opt_state=tx.init(params),
    )


def update_ema(ema: dict[str, Any], params: Any, step: jax.Array, warmup: bool) -> dict[str, Any]:
    """One EMA update per rate; with ``warmup`` the decay is ``min(rate, (1+t)/(10+t))``.

    The warm-up keeps early EMA weights from being dominated by the random initialisation,
    which matters for the short runs this library trains on a CPU.
    """
    out = {}
    for key, tree in ema.items():
        decay = jnp.float32(float(key))
        if warmup:
            t = step.astype(jnp.float32)
            decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        out[key] = jax.tree.map(lambda e, p, d=decay: d * e + (1.0 - d) * p, tree, params)
    return out
