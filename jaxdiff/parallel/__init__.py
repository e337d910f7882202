"""Meshes, shardings and host-local to global arrays: the one place devices are named.

jaxdiff uses a single :class:`jax.sharding.Mesh` with axes ``('data', 'fsdp', 'tensor')``
and *Auto* axis types (GSPMD / pjit semantics: jit with explicit in/out shardings). Batches
are split over ``('data', 'fsdp')``; params carry logical axis names (see
:data:`jaxdiff.models.LOGICAL_AXES`) mapped to mesh axes by rules, so the same model runs
data-parallel, FSDP or tensor-parallel by changing only the mesh shape and the rules.

Modules: :mod:`~jaxdiff.parallel.mesh` (meshes, shardings, host <-> global arrays),
:mod:`~jaxdiff.parallel.distributed` (multi-process start-up),
:mod:`~jaxdiff.parallel.generate` (many samples over the mesh),
:mod:`~jaxdiff.parallel.prefetch` (device prefetch of input batches).
"""

from jaxdiff.parallel.distributed import Timeouts, initialize_distributed, is_main_process
from jaxdiff.parallel.generate import BatchedOutput, make_sharded_generate
from jaxdiff.parallel.mesh import (
    BATCH_AXES,
    DATA_PARALLEL_RULES,
    DEFAULT_RULES,
    MESH_AXES,
    batch_sharding,
    batch_size_per_device_check,
    global_batch,
    make_mesh,
    num_slices,
    param_shardings,
    put_global,
    replicated,
    to_host,
)
from jaxdiff.parallel.prefetch import DevicePrefetcher, prefetch_to_mesh

__all__ = [
    "BATCH_AXES",
    "DATA_PARALLEL_RULES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "BatchedOutput",
    "DevicePrefetcher",
    "Timeouts",
    "batch_sharding",
    "batch_size_per_device_check",
    "global_batch",
    "initialize_distributed",
    "is_main_process",
    "make_mesh",
    "make_sharded_generate",
    "num_slices",
    "param_shardings",
    "prefetch_to_mesh",
    "put_global",
    "replicated",
    "to_host",
]
