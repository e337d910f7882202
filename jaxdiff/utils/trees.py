"""Nested dicts of arrays <-> flat ``{"a/b/c": array}`` dicts, the key form files use.

Weight files (safetensors, ``.npz``) store flat names; Flax params are nested dicts. The
``/`` separator cannot appear inside a key, so a flat name maps back to one path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Flattens a nested dict of arrays to ``{"a/b/c": array}``.

    Args:
      tree: Nested mappings whose leaves are arrays (or array-likes).
      prefix: Prepended to every name (used by the recursion).

    Returns:
      A flat dict of numpy arrays, in the tree's iteration order.

    Raises:
      ValueError: If a key contains ``"/"``.
    """
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if "/" in str(key):
            raise ValueError(f"key {key!r} contains '/', which separates levels")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, name + "/"))
        else:
            flat[name] = np.asarray(value)
    return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_tree`: ``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


__all__ = ["flatten_tree", "unflatten_tree"]
