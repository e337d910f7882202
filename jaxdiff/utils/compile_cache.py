"""The persistent XLA compilation cache: a restarted job loads its programs instead of compiling.

XLA compiles every jitted program when it is first called (a DiT-XL/2 train step takes
minutes unrolled). With a cache folder set, each compiled executable is written there,
keyed by the program, the compile options and the backend, and the next process that
compiles the same program loads it. It pays off for restarts after preemption, for
`python -m sample` runs on the same model and for every worker of a pod reading a
shared (``gs://``) folder.

The cache holds executable code: point it only at a folder that only you (or your job)
can write.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def enable_compile_cache(path: str | None, min_compile_seconds: float = 0.0) -> bool:
    """Turns on JAX's persistent compilation cache in ``path`` (None leaves it as it is).

    Every program is cached, however small or quick to compile
    (``jax_persistent_cache_min_compile_time_secs`` and ``..._min_entry_size_bytes``
    lowered). JAX's default ``jax_persistent_cache_enable_xla_caches`` keeps XLA's GPU
    autotuning results beside the executables, so a warm start skips autotuning too. JAX
    reads these settings when it first compiles, so call
    this before any jitted call; a later call with a different folder is used from the
    next compile on.

    Args:
        path: a local folder or ``gs://`` URL; created if missing. None does nothing.
        min_compile_seconds: only cache programs that took at least this long.

    Returns:
        True if a cache folder was set.
    """
    if not path:
        return False
    path = str(path)
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if previous and previous != path:
        # JAX opens its cache once per process; reset it so the new folder is used.
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    log.info("persistent compilation cache: %s", path)
    return True


__all__ = ["enable_compile_cache"]
