"""Meshes, shardings and host-local to global arrays: the one place devices are named.

jaxdiff uses a single :class:`jax.sharding.Mesh` with axes ``('data', 'fsdp', 'tensor')``
and *Auto* axis types (GSPMD / pjit semantics: jit with explicit in/out shardings). Batches
are split over ``('data', 'fsdp')``; params carry logical axis names (see
:data:`jaxdiff.models.LOGICAL_AXES`) mapped to mesh axes by rules, so the same model runs
data-parallel, FSDP or tensor-parallel by changing only the mesh shape and the rules.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical parameter axes (jaxdiff.models.LOGICAL_AXES) -> mesh axes. With fsdp = tensor = 1
# these shard over size-1 axes, i.e. plain data parallelism; with fsdp > 1 each weight's
# model-width axis is split (ZeRO-3 style: params, EMA and Adam moments all sharded); with
# tensor > 1 the MLP hidden and attention-head axes are split (Megatron style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", None),
    ("patch", None),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
)
DATA_PARALLEL_RULES: tuple[tuple[str, Any], ...] = ()
"""Rules that replicate every parameter."""


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[Any] | None = None,
    num_devices: int = -1,
) -> Mesh:
    """Builds the ``('data', 'fsdp', 'tensor')`` mesh with Auto axis types.

    Args:
        data: size of the data-parallel axis; -1 takes all remaining devices.
        fsdp: size of the parameter-sharding axis.
        tensor: size of the tensor-parallel axis.
        devices: devices to use (default: all of ``jax.devices()``).
        num_devices: use only the first this many devices (-1 = all); mainly for tests
            and for restoring a checkpoint onto a smaller mesh.

    Returns:
        The mesh.

    Raises:
        ValueError: if the axis sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices != -1:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
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


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (e.g. a 1-channel input conv)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*out)


def param_shardings(
    boxed_variables: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> Any:
    """Maps a boxed (logically partitioned) variable tree to NamedShardings on ``mesh``.

    Logical names without a rule are replicated, and so is any dimension the mapped mesh
    axes do not divide evenly.

    Args:
        boxed_variables: params as returned by ``model.init`` (or its ``jax.eval_shape``),
            still wrapped in ``nn.LogicallyPartitioned`` boxes.
        mesh: the device mesh.
        rules: logical-to-mesh axis rules.

    Returns:
        A tree of NamedShardings shaped like the unboxed params.
    """
    specs = nn.get_partition_spec(boxed_variables)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.unbox(boxed_variables)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts JAX's distributed runtime when this is (or may be) a multi-process job.

    On TPU pods and SLURM, ``jax.distributed.initialize()`` detects everything itself;
    elsewhere pass the coordinator explicitly (or set ``JAXDIFF_COORDINATOR``,
    ``JAXDIFF_NUM_PROCESSES`` and ``JAXDIFF_PROCESS_ID``). Must run before any other JAX
    call. A single process with nothing to detect is left alone.

    Returns:
        True if the distributed runtime was started.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAXDIFF_COORDINATOR")
    if num_processes is None and "JAXDIFF_NUM_PROCESSES" in env:
        num_processes = int(env["JAXDIFF_NUM_PROCESSES"])
    if process_id is None and "JAXDIFF_PROCESS_ID" in env:
        process_id = int(env["JAXDIFF_PROCESS_ID"])
    if coordinator_address is not None:
        # CPU processes need a collectives backend to talk to each other; the setting only
        # affects CPU devices (asking for the backend here would start it too early).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if any(
        k in env for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
    ):
        jax.distributed.initialize()
        return True
    return False


def is_main_process() -> bool:
    """True on process 0: the only one that logs, writes images and shows progress."""
    return jax.process_index() == 0
