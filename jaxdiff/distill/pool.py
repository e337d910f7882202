"""Discriminator pools (NitroFusion): many heads stacked on a leading axis.

The pool's params are one :class:`~jaxdiff.distill.heads.DiscHead` param tree whose every
leaf has a leading ``[num_heads]`` axis; heads are applied with ``jax.vmap``. Per head a
:class:`PoolSpec` row says whether it is *local* (patch logits) or *global*, whether it is
*conditional* (projection term), and which *noise-level group* it judges: a head only sees
samples whose time ``t`` (in [0, 1]) falls in its group's equal-width interval.

Each critic step trains a random subset of heads (:func:`choose_subset`; the others keep
their params *and* optimizer moments, :func:`masked_apply`) and re-initialises a random
fraction of heads together with their optimizer moments (:func:`refresh`). A pool of one
global conditional head in one group, no subset, no refresh, is the plain DMD2 head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.distill.heads import DiscHead, head_logits

HEAD_KINDS = ("global_cond", "global_uncond", "local_cond", "local_uncond")
"""Head types of a pool (NitroFusion uses ``global_cond, local_cond, local_uncond``)."""


class PoolSpec(NamedTuple):
    """Per-head flags, each ``[num_heads]``: ``local`` bool, ``conditional`` bool, ``group`` int."""

    local: jax.Array
    conditional: jax.Array
    group: jax.Array

    @property
    def num_heads(self) -> int:
        """Heads in the pool."""
        return int(self.group.shape[0])


def make_pool_spec(num_heads: int, kinds: Sequence[str], num_groups: int = 1) -> PoolSpec:
    """Assigns head ``i`` the kind ``kinds[i % len(kinds)]`` and group ``(i // len(kinds)) % G``.

    Raises:
        ValueError: for an unknown kind or sizes below 1.
    """
    if num_heads < 1 or num_groups < 1 or not kinds:
        raise ValueError(
            f"need num_heads, num_groups >= 1 and kinds, got {num_heads}, {num_groups}"
        )
    bad = [k for k in kinds if k not in HEAD_KINDS]
    if bad:
        raise ValueError(f"unknown head kinds {bad}: choose from {HEAD_KINDS}")
    names = [kinds[i % len(kinds)] for i in range(num_heads)]
    return PoolSpec(
        local=jnp.asarray([n.startswith("local") for n in names]),
        conditional=jnp.asarray([n.endswith("_cond") for n in names]),
        group=jnp.asarray([(i // len(kinds)) % num_groups for i in range(num_heads)], jnp.int32),
    )


def init_pool(head: DiscHead, key: jax.Array, num_heads: int, feats, noise_label, cond) -> Any:
    """Initialises ``num_heads`` independent heads, stacked on axis 0."""
    keys = jax.random.split(key, num_heads)
    return jax.vmap(lambda k: head.init(k, feats, noise_label, cond)["params"])(keys)


def sample_groups(t: jax.Array, num_groups: int) -> jax.Array:
    """Noise-level group of each sample: equal-width bins of ``t`` in [0, 1]."""
    return jnp.clip(jnp.floor(jnp.asarray(t) * num_groups).astype(jnp.int32), 0, num_groups - 1)


def pool_logits(
    head: DiscHead,
    pool: Any,
    spec: PoolSpec,
    feats: Sequence[jax.Array],
    noise_label: jax.Array,
    cond: jax.Array | None,
    t: jax.Array,
    num_groups: int,
    idx: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Applies the heads ``idx`` (default all) of the pool.

    Returns:
        ``(ratio_logits [H, B], loss_logits [H, B, P], mask [H, B])``; ``mask`` marks the
        samples in each head's noise-level group.
    """
    if idx is None:
        idx = jnp.arange(spec.num_heads)
    sub = jax.tree.map(lambda p: p[idx], pool)

    def one(p, local, conditional):
        return head_logits(head, p, feats, noise_label, cond, local=local, conditional=conditional)

    ratio, loss_logits = jax.vmap(one)(sub, spec.local[idx], spec.conditional[idx])
    mask = spec.group[idx][:, None] == sample_groups(t, num_groups)[None, :]
    return ratio, loss_logits, mask.astype(jnp.float32)


def masked_head_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sample mean over the heads whose group holds the sample: ``[H, B] -> [B]``."""
    return jnp.sum(values * mask, axis=0) / jnp.maximum(jnp.sum(mask, axis=0), 1.0)


def choose_subset(key: jax.Array, num_heads: int, size: int) -> jax.Array:
    """``size`` distinct random head indices (all heads, in order, when ``size >= num_heads``)."""
    if size >= num_heads:
        return jnp.arange(num_heads)
    return jax.random.permutation(key, num_heads)[:size]


def _rows(mask: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    m = mask.reshape(mask.shape + (1,) * (new.ndim - 1))
    return jnp.where(m, new, old)


def _param_leaf_flags(tx: optax.GradientTransformation, opt_state: Any) -> Any:
    return optax.tree_map_params(
        tx,
        lambda _: True,
        opt_state,
        transform_non_params=lambda v: jax.tree.map(lambda _: False, v),
    )


def select_rows(
    tx: optax.GradientTransformation, mask: jax.Array, new_opt: Any, old_opt: Any
) -> Any:
    """Takes rows ``mask`` of every param-shaped leaf from ``new_opt``, the rest from ``old_opt``.

    Non-param leaves (e.g. Adam's step count) come from ``new_opt``.
    """
    flags = _param_leaf_flags(tx, new_opt)
    return jax.tree.map(
        lambda is_p, n, o: _rows(mask, n, o) if is_p else n, flags, new_opt, old_opt
    )


def masked_apply(
    tx: optax.GradientTransformation, grads: Any, opt_state: Any, pool: Any, mask: jax.Array
) -> tuple[Any, Any]:
    """One optimizer update of only the heads in ``mask`` (``[H]`` bool).

    Unselected heads keep their params and their optimizer moments unchanged.
    """
    updates, new_opt = tx.update(grads, opt_state, pool)
    new_pool = optax.apply_updates(pool, updates)
    return (
        jax.tree.map(lambda n, o: _rows(mask, n, o), new_pool, pool),
        select_rows(tx, mask, new_opt, opt_state),
    )


def refresh_mask(key: jax.Array, num_heads: int, fraction: float) -> jax.Array:
    """Exactly ``round(fraction * num_heads)`` heads, chosen at random (``[H]`` bool)."""
    count = int(np.round(fraction * num_heads))
    if count <= 0:
        return jnp.zeros((num_heads,), bool)
    chosen = jax.random.permutation(key, num_heads)[:count]
    return jnp.zeros((num_heads,), bool).at[chosen].set(True)


def refresh(
    tx: optax.GradientTransformation,
    pool: Any,
    opt_state: Any,
    fresh_pool: Any,
    mask: jax.Array,
) -> tuple[Any, Any]:
    """Re-initialises heads ``mask``: their params from ``fresh_pool``, moments from scratch.

    Args:
        tx: the pool's optimizer.
        pool: current stacked params.
        opt_state: current optimizer state.
        fresh_pool: newly initialised stacked params (e.g. from :func:`init_pool`).
        mask: ``[H]`` bool, the heads to reset.

    Returns:
        ``(pool, opt_state)``; the other heads and all non-param leaves are untouched.
    """
    new_pool = jax.tree.map(lambda f, o: _rows(mask, f, o), fresh_pool, pool)
    fresh_opt = tx.init(fresh_pool)
    flags = _param_leaf_flags(tx, opt_state)
    new_opt = jax.tree.map(
        lambda is_p, f, o: _rows(mask, f, o) if is_p else o, flags, fresh_opt, opt_state
    )
    return new_pool, new_opt


__all__ = [
    "HEAD_KINDS",
    "PoolSpec",
    "choose_subset",
    "init_pool",
    "make_pool_spec",
    "masked_apply",
    "masked_head_mean",
    "pool_logits",
    "refresh",
    "refresh_mask",
    "sample_groups",
    "select_rows",
]
