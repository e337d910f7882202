"""Scanned <-> unrolled layouts of DiT params, so checkpoints load either way.

``DiT(scan_blocks=False)`` keeps each block's params under ``block_0 .. block_{d-1}``;
``DiT(scan_blocks=True)`` keeps them stacked under ``blocks`` with a leading axis of size
``depth``. The two networks compute the same function, and these functions move params
between the layouts exactly (a stack / an index, no arithmetic).

Example::

    params = to_layout(params, scanned=model.scan_blocks)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_BLOCK = re.compile(r"block_(\d+)$")


def _inner(params: Mapping) -> tuple[Mapping, Callable[[dict], dict]]:
    """The tree holding the blocks (a variables dict's ``"params"``) and how to rewrap it."""
    if not isinstance(params, Mapping):
        raise ValueError(f"expected a dict of DiT params, got {type(params).__name__}")
    boxed = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nn.meta.AxisMetadata))
    if any(isinstance(v, nn.meta.AxisMetadata) for v in boxed):
        raise ValueError("params hold Partitioned boxes; pass nn.unbox(params)")
    if "params" in params and isinstance(params["params"], Mapping):
        return params["params"], lambda inner: {**params, "params": inner}
    return params, dict


def _block_indices(tree: Mapping) -> list[int]:
    return sorted(int(m.group(1)) for k in tree if (m := _BLOCK.match(str(k))))


def _stack(leaves: list[Any]) -> Any:
    # Keep host (numpy) trees on the host: checkpoint conversion need not touch a device.
    if all(isinstance(v, np.ndarray) for v in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def stack_blocks(params: Mapping, depth: int | None = None) -> dict:
    """Converts unrolled DiT params (``block_i``) to the scanned layout (``blocks``).

    Args:
      params: Unboxed params of a ``scan_blocks=False`` DiT (or its variables dict with
        a ``"params"`` entry); numpy or jax arrays.
      depth: Expected number of blocks; None takes the number found.

    Returns:
      The same tree with ``block_0 .. block_{depth-1}`` replaced by ``blocks``, whose
      leaves are the blocks' leaves stacked on a new leading axis.

    Raises:
      ValueError: If the tree is boxed, already scanned, or its blocks are not exactly
        ``block_0 .. block_{depth-1}`` with identical structures.
    """
    tree, rewrap = _inner(params)
    found = _block_indices(tree)
    if "blocks" in tree:
        raise ValueError("params already hold 'blocks' (scanned layout); nothing to stack")
    depth = len(found) if depth is None else depth
    if not found or found != list(range(depth)):
        raise ValueError(
            f"expected unrolled blocks block_0..block_{depth - 1}, found "
            f"{[f'block_{i}' for i in found]}; is this a DiT param tree?"
        )
    blocks = [tree[f"block_{i}"] for i in range(depth)]
    structures = {jax.tree.structure(b) for b in blocks}
    if len(structures) != 1:
        raise ValueError("DiT blocks have different param structures; cannot stack them")
    rest = {k: v for k, v in tree.items() if not _BLOCK.match(str(k))}
    return rewrap({**rest, "blocks": jax.tree.map(lambda *v: _stack(list(v)), *blocks)})


def unstack_blocks(params: Mapping) -> dict:
    """Converts scanned DiT params (``blocks``) to the unrolled layout (``block_i``).

    Args:
      params: Unboxed params of a ``scan_blocks=True`` DiT (or its variables dict);
        numpy or jax arrays.

    Returns:
      The same tree with ``blocks`` replaced by ``block_0 .. block_{depth-1}``, slices
      of its leaves along the leading axis.

    Raises:
      ValueError: If the tree is boxed, has no ``blocks``, also has ``block_i`` entries,
        or the ``blocks`` leaves disagree on the leading axis.
    """
    tree, rewrap = _inner(params)
    if "blocks" not in tree:
        raise ValueError(
            f"params have no 'blocks' entry (scanned layout); found keys {sorted(map(str, tree))}"
        )
    if _block_indices(tree):
        raise ValueError("params hold both 'blocks' and 'block_i' entries; which layout?")
    leaves = jax.tree.leaves(tree["blocks"])
    sizes = {np.shape(v)[0] if np.ndim(v) else None for v in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"'blocks' leaves need one shared leading (depth) axis, got {sizes}")
    (depth,) = sizes
    rest = {k: v for k, v in tree.items() if k != "blocks"}
    blocks = tree["blocks"]
    unrolled = {f"block_{i}": jax.tree.map(lambda v, i=i: v[i], blocks) for i in range(depth)}
    return rewrap({**rest, **unrolled})


def to_layout(params: Mapping, scanned: bool) -> dict | Mapping:
    """Puts DiT params in the layout of a ``scan_blocks=scanned`` model.

    Detects the current layout and converts only when it differs, so it is idempotent
    and safe to call on any loaded checkpoint.

    Args:
      params: Unboxed DiT params (or variables dict) in either layout.
      scanned: Target layout: True for ``scan_blocks=True`` models.

    Returns:
      ``params`` itself when already in the target layout, else the converted tree.

    Raises:
      ValueError: If the tree holds no DiT blocks, or both layouts at once.
    """
    tree, _ = _inner(params)
    has_scanned, has_unrolled = "blocks" in tree, bool(_block_indices(tree))
    if has_scanned == has_unrolled:
        what = "both 'blocks' and 'block_i'" if has_scanned else "neither 'blocks' nor 'block_i'"
        raise ValueError(f"params hold {what}; expected one DiT block layout")
    if has_scanned == scanned:
        return params
    return stack_blocks(params) if scanned else unstack_blocks(params)
