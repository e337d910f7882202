"""Meshes, shardings and host-local to global arrays: the one place devices are named.

jaxdiff uses a single :class:`jax.sharding.Mesh` with axes ``('data', 'fsdp', 'tensor')``
and *Auto* axis types (GSPMD / pjit semantics: jit with explicit in/out shardings). Batches
are split over ``('data', 'fsdp')``; params carry logical axis names (see
:data:`jaxdiff.models.LOGICAL_AXES`) mapped to mesh axes by rules, so the same model runs
data-parallel, FSDP or tensor-parallel by changing only the mesh shape and the rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Data parallel: every parameter replicated. FSDP/tensor rules are added by the scaling work.
DATA_PARALLEL_RULES: tuple[tuple[str, Any], ...] = ()


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """Builds the ``('data', 'fsdp', 'tensor')`` mesh with Auto axis types.

    Args:
        data: size of the data-parallel axis; -1 takes all remaining devices.
        fsdp: size of the parameter-sharding axis.
        tensor: size of the tensor-parallel axis.
        devices: devices to use (default: all of ``jax.devices()``).

    Returns:
        The mesh.

    Raises:
        ValueError: if the axis sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1:
        if fsdp < 1 or tensor < 1 or n % (fsdp * tensor):
            raise ValueError(
                f"mesh fsdp={fsdp} x tensor={tensor} does not divide the {n} devices: "
                "choose sizes whose product divides the device count"
            )
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n or min(data, fsdp, tensor) < 1:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} "
            f"does not match the {n} devices: set data=-1 to fill the rest automatically"
        )
    grid = np.asarray(devices).reshape(data, fsdp, tensor)
    auto = (jax.sharding.AxisType.Auto,) * 3
    return Mesh(grid, MESH_AXES, axis_types=auto)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading axis split over ``('data', 'fsdp')``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_size_per_device_check(global_batch_size: int, mesh: Mesh) -> None:
    """Raises a clear error if the global batch does not split evenly over the batch axes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % shards or global_batch_size % jax.process_count():
        raise ValueError(
            f"batch_size={global_batch_size} is not divisible by the {shards} batch shards "
            f"(data x fsdp) and {jax.process_count()} processes: use a multiple of "
            f"{np.lcm(shards, jax.process_count())}, e.g. --config.train.batch_size="
            f"{int(np.lcm(shards, jax.process_count())) * max(1, global_batch_size // shards)}"
        )


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Assembles global arrays from each process's local batch (a pytree of numpy arrays)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)


def param_shardings(
    boxed_variables: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DATA_PARALLEL_RULES
) -> Any:
    """Maps a boxed (logically partitioned) variable tree to NamedShardings on ``mesh``.

    Logical names without a rule are replicated.
    """
    specs = nn.get_partition_spec(boxed_variables)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def is_main_process() -> bool:
    """True on process 0: the only one that logs, writes images and shows progress."""
    return jax.process_index() == 0
