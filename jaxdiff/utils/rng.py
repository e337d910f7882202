"""Per-sample randomness: the one helper for per-sample keys and the one start-noise draw.

Every sample is seeded by its *global* index, ``fold_in(key, index)``, so a sample does
not depend on the batch it is drawn in, on chunking, or on the device count: sample 5 is
the same image whether drawn alone or among 10,000.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def per_sample_keys(key: jax.Array, count: int, start: int | jax.Array = 0) -> jax.Array:
    """``[count]`` keys ``fold_in(key, start + j)`` for global sample indices ``start + j``.

    Args:
        key: one PRNG key (typed, or raw ``uint32[2]``).
        count: number of samples (static).
        start: global index of the first sample (int or traced int32 scalar).

    Example:
        >>> keys = per_sample_keys(jax.random.key(0), 4, start=8)  # samples 8..11
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return jax.vmap(lambda j: jax.random.fold_in(key, j))(start + jnp.arange(count))


def start_noise(keys: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Unit Gaussian noise ``[B, *shape]``, sample ``b`` drawn from ``keys[b]``.

    Every sampler's start (``noise * sigmas[0]``) is drawn here, so a sample's image
    depends only on its key.
    """
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), dtype))(keys)


__all__ = ["per_sample_keys", "start_noise"]
