"""Discriminator pools (NitroFusion): many heads stacked on a leading axis.

The pool's params are one :class:`~jaxdiff.distill.heads.DiscHead` param tree whose every
leaf has a leading ``[num_heads]`` axis; heads are applied with ``jax.vmap``. Per head a
:class:`PoolSpec` row says whether it is *local* (patch logits) or *global*, whether it is
*conditional* (projection term), and which *noise-level group* it judges: a head only sees
samples whose time ``t`` (in [0, 1]) falls in its group's equal-width interval.

Every head has its own optimizer state, step count included (:func:`per_head`). Each
critic step trains a random subset of heads (:func:`choose_subset`; the others keep
their params *and* optimizer state, :func:`masked_apply`) and re-initialises a random
fraction of heads together with their optimizer state (:func:`refresh`), so a refreshed
head trains exactly like a new one. A pool of one global conditional head in one group,
no subset, no refresh, is the plain DMD2 head.
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


def per_head(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` run independently on every head of a pool (``vmap`` over the head axis).

    Every leaf of the state, Adam's step ``count`` included, gets a leading ``[num_heads]``
    axis, so each head is its own optimizer: a re-initialised head's bias correction
    restarts (:func:`refresh`), an untrained head's count does not advance
    (:func:`masked_apply`), and a global-norm clip bounds each head's gradient separately.

    Args:
        tx: the optimizer of *one* head.
    """

    def init(params):
        return jax.vmap(tx.init)(params)

    def update(updates, state, params=None):
        if params is None:
            return jax.vmap(lambda u, s: tx.update(u, s))(updates, state)
        return jax.vmap(tx.update)(updates, state, params)

    return optax.GradientTransformation(init, update)


def _rows(mask: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    if new.ndim == 0 or new.shape[0] != mask.shape[0]:
        raise ValueError(
            f"pool state leaf of shape {new.shape} has no leading axis of {mask.shape[0]} "
            "heads: build the pool's optimizer with pool.per_head(tx)"
        )
    m = mask.reshape(mask.shape + (1,) * (new.ndim - 1))
    return jnp.where(m, new, old)


def select_rows(mask: jax.Array, new: Any, old: Any) -> Any:
    """Rows ``mask`` (``[H]`` bool) of every leaf from ``new``, the other rows from ``old``."""
    return jax.tree.map(lambda n, o: _rows(mask, n, o), new, old)


def masked_apply(
    tx: optax.GradientTransformation, grads: Any, opt_state: Any, pool: Any, mask: jax.Array
) -> tuple[Any, Any]:
    """One optimizer update of only the heads in ``mask`` (``[H]`` bool).

    Unselected heads keep their params and their whole optimizer state (moments and step
    count), as a PyTorch optimizer skips parameters without a gradient.

    Args:
        tx: the pool's optimizer, :func:`per_head` of one head's.
        grads: gradients shaped like ``pool``.
        opt_state: ``tx``'s state.
        pool: stacked params.
        mask: the heads to update.

    Raises:
        ValueError: if ``tx`` is not per-head (a state leaf lacks the head axis).
    """
    updates, new_opt = tx.update(grads, opt_state, pool)
    new_pool = optax.apply_updates(pool, updates)
    return select_rows(mask, new_pool, pool), select_rows(mask, new_opt, opt_state)


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
    """Re-initialises heads ``mask``: params from ``fresh_pool``, optimizer state from scratch.

    A refreshed head's optimizer state is exactly a fresh optimizer's (zero moments, step
    count 0), so its next update equals a new head's first Adam step.

    Args:
        tx: the pool's optimizer, :func:`per_head` of one head's.
        pool: current stacked params.
        opt_state: current optimizer state.
        fresh_pool: newly initialised stacked params (e.g. from :func:`init_pool`).
        mask: ``[H]`` bool, the heads to reset.

    Returns:
        ``(pool, opt_state)``; the other heads and their states are untouched.

    Raises:
        ValueError: if ``tx`` is not per-head (a state leaf lacks the head axis).
    """
    return select_rows(mask, fresh_pool, pool), select_rows(mask, tx.init(fresh_pool), opt_state)


__all__ = [
    "HEAD_KINDS",
    "PoolSpec",
    "choose_subset",
    "init_pool",
    "make_pool_spec",
    "masked_apply",
    "masked_head_mean",
    "per_head",
    "pool_logits",
    "refresh",
    "refresh_mask",
    "sample_groups",
    "select_rows",
]
