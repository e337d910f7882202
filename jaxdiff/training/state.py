"""Train state: params, EMA copies (constant rates and power profiles), optax state, step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxdiff.parallel import param_shardings, replicated
from jaxdiff.training.phema import (
    check_std,
    key_std,
    power_update,
    power_weight,
    std_key,
    std_to_exp,
)


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries between steps (a pytree, checkpointed whole).

    Attributes:
        step: int32 number of optimizer updates done.
        params: the network parameters (unboxed).
        ema: EMA copies of ``params``: constant rates keyed by rate (``"0.999"``) and
            power-function profiles keyed by relative std (``"std0.050"``, see
            :mod:`jaxdiff.training.phema`).
        opt_state: the optax state.
    """

    step: jax.Array
    params: Any
    ema: dict[str, Any]
    opt_state: Any


def ema_key(rate: float) -> str:
    """The dictionary key of an EMA rate, e.g. ``0.999 -> "0.999"``."""
    return f"{rate:g}"


def ema_keys(ema_rates: Sequence[float], ema_stds: Sequence[float] = ()) -> list[str]:
    """The EMA dict keys of a run: its rates first, then its power profiles."""
    return [ema_key(r) for r in ema_rates] + [std_key(s) for s in ema_stds]


def copy_tree(tree: Any) -> Any:
    """A copy of every array leaf: a new state never aliases its source's buffers.

    Distillation states start from the teacher's params, which they must not share with it:
    a jitted step donates the state, and donating a shared buffer would delete the
    teacher's.
    """
    return jax.tree.map(jnp.array, tree)


def create_train_state(
    params: Any,
    tx: optax.GradientTransformation,
    ema_rates: Sequence[float],
    ema_stds: Sequence[float] = (),
) -> TrainState:
    """Builds the initial state: EMA copies start equal to ``params``.

    Args:
        params: the initial params.
        tx: the optimizer.
        ema_rates: constant EMA rates (``"0.999"`` keys).
        ema_stds: power-function EMA profiles by relative std (``"std0.050"`` keys).

    Raises:
        ValueError: if an EMA rate lies outside [0, 1) or a std outside (0, 0.289).
    """
    for rate in ema_rates:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EMA rate must lie in [0, 1), got {rate}")
    for std in ema_stds:
        check_std(std, "ema_stds")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema={k: jax.tree.map(jnp.copy, params) for k in ema_keys(ema_rates, ema_stds)},
        opt_state=tx.init(params),
    )


def update_ema(ema: dict[str, Any], params: Any, step: jax.Array, warmup: bool) -> dict[str, Any]:
    """One EMA update per key, after the optimizer update made at ``step``.

    A rate key decays by ``rate``, with ``warmup`` by ``min(rate, (1+t)/(10+t))``: the
    warm-up keeps early EMA weights from being dominated by the random initialisation,
    which matters for the short runs this library trains on a CPU. A power profile
    (``"std0.050"``) uses EDM2's ``beta = (1 - 1/(step+1))^(gamma+1)``, which ramps up by
    itself (the first update copies the params), so ``warmup`` does not apply to it.
    """
    out = {}
    for key, tree in ema.items():
        std = key_std(key)
        if std is not None:
            out[key] = power_update(tree, params, power_weight(step, std_to_exp(std)))
            continue
        decay = jnp.float32(float(key))
        if warmup:
            t = step.astype(jnp.float32)
            decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        out[key] = jax.tree.map(lambda e, p, d=decay: d * e + (1.0 - d) * p, tree, params)
    return out


def apply_gradients(state: TrainState, grads: Any, tx: Any, ema_warmup: bool) -> TrainState:
    """One optimizer update of ``state`` with ``grads``: params, EMAs, step, ``tx``'s state."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(
        step=state.step + 1,
        params=params,
        ema=update_ema(state.ema, params, state.step, ema_warmup),
        opt_state=opt_state,
    )


def train_state_shardings(abstract: TrainState, p_shard: Any, tx, mesh: Mesh) -> TrainState:
    """Shardings of a TrainState: params, EMA and param-shaped optimizer leaves as ``p_shard``.

    Args:
        abstract: the state's shapes (``jax.eval_shape`` of its init).
        p_shard: NamedShardings shaped like the params.
        tx: the optimizer whose state ``abstract.opt_state`` is.
        mesh: the mesh; everything that is not param-shaped is replicated on it.
    """
    rep = replicated(mesh)
    opt = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, p_shard, transform_non_params=lambda _: rep
    )
    return TrainState(
        step=rep, params=p_shard, ema={k: p_shard for k in abstract.ema}, opt_state=opt
    )


def init_params_fn(
    model: nn.Module, sample_shape: tuple[int, ...], num_classes: int
) -> Callable[[jax.Array], Any]:
    """``key -> boxed params`` of ``model`` (logical axis names kept, for shardings)."""
    x = jnp.zeros((1, *sample_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    c = jnp.zeros((1,), jnp.int32) if num_classes else None

    def boxed_init(key):
        return model.init({"params": key, "dropout": key}, x, t, c)["params"]

    return boxed_init


def param_projection(model: nn.Module) -> Callable[[Any], Any]:
    """The model's constraint on its params, applied after init and every update.

    A model class may define ``project_params(params) -> params`` (EDM2's forced weight
    normalisation); others get the identity.
    """
    return getattr(model, "project_params", None) or (lambda params: params)


def make_state_fns(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    sample_shape: tuple[int, ...],
    num_classes: int,
    ema_rates: tuple[float, ...],
    ema_stds: tuple[float, ...] = (),
) -> tuple[Callable[[jax.Array], TrainState], TrainState]:
    """Returns ``init_fn(key) -> TrainState`` and the state's shardings on ``mesh``."""
    boxed_init = init_params_fn(model, sample_shape, num_classes)
    project = param_projection(model)

    def init_fn(key):
        return create_train_state(project(nn.unbox(boxed_init(key))), tx, ema_rates, ema_stds)

    key = jax.random.key(0)
    p_shard = param_shardings(jax.eval_shape(boxed_init, key), mesh)
    return init_fn, train_state_shardings(jax.eval_shape(init_fn, key), p_shard, tx, mesh)


def abstract_state(init_fn: Callable, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``init_fn``'s output with target shardings (to restore onto)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(init_fn, jax.random.key(0)),
        shardings,
    )
