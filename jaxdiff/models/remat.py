"""Named rematerialisation (gradient checkpointing) policies for the model blocks.

Rematerialisation trades compute for memory: the backward pass recomputes activations
of a block instead of keeping them from the forward pass. The policies, by name:

* ``"none"``: keep every activation (fastest, most memory);
* ``"dots"``: keep the outputs of matrix multiplies without batch dimensions (the dense
  layers' outputs, :func:`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`) and
  recompute the cheap, memory-bound ops between them (norms, activations, residual
  adds) and attention (its batched dots); a good middle ground on accelerators, where
  those ops cost bandwidth rather than FLOPs;
* ``"full"``: keep only each block's inputs and recompute the whole block in the
  backward pass (the least memory; about one extra forward pass, i.e. ~ +33% FLOPs
  for a training step).

``True`` and ``False`` are accepted for backward compatibility and mean ``"full"`` and
``"none"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

REMAT_POLICIES: tuple[str, ...] = ("none", "dots", "full")
"""Accepted rematerialisation policy names (see the module docstring)."""


def remat_name(remat: str | bool) -> str:
    """Normalises a remat setting to one of :data:`REMAT_POLICIES`.

    Args:
      remat: A policy name, or a bool (``False`` -> ``"none"``, ``True`` -> ``"full"``).

    Returns:
      The policy name.

    Raises:
      ValueError: If the name is not one of :data:`REMAT_POLICIES`.
    """
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"unknown remat policy {remat!r}; allowed: {REMAT_POLICIES} (or True/False)"
        )
    return remat


def checkpoint_policy(remat: str | bool) -> Callable[..., bool] | None:
    """The ``policy=`` argument of :func:`flax.linen.remat` for a remat setting.

    Args:
      remat: ``"dots"`` or ``"full"`` (or ``True``); ``"none"`` has no policy because
        nothing is rematerialised.

    Returns:
      :func:`jax.checkpoint_policies.dots_with_no_batch_dims_saveable` for ``"dots"``;
      None (save nothing, recompute everything) for ``"full"``.

    Raises:
      ValueError: For an unknown name, or for ``"none"`` (no remat to configure).
    """
    name = remat_name(remat)
    if name == "none":
        raise ValueError("remat policy 'none' rematerialises nothing; use maybe_remat")
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable if name == "dots" else None


def maybe_remat(
    module_cls: type[nn.Module],
    remat: str | bool,
    static_argnums: Sequence[int] = (),
    prevent_cse: bool = True,
) -> Any:
    """Wraps a module class in :func:`flax.linen.remat` with a named policy.

    Args:
      module_cls: The block class.
      remat: A name from :data:`REMAT_POLICIES` or a bool.
      static_argnums: Indices of static ``__call__`` arguments, counting ``self`` as 0
        (e.g. a Python-bool ``deterministic`` flag).
      prevent_cse: Passed to :func:`flax.linen.remat`; False is safe (and lets XLA
        optimise more) when the block runs inside ``nn.scan``.

    Returns:
      ``module_cls`` unchanged for ``"none"``, else the rematerialised class.

    Raises:
      ValueError: If ``remat`` is not a known policy.
    """
    name = remat_name(remat)
    if name == "none":
        return module_cls
    return nn.remat(
        module_cls,
        policy=checkpoint_policy(name),
        static_argnums=tuple(static_argnums),
        prevent_cse=prevent_cse,
    )
