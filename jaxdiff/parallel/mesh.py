"""Meshes and shardings, and host-local to global arrays.

The ``('data', 'fsdp', 'tensor')`` mesh laid out over the topology, batch and parameter
shardings, and the two transfers every multi-process program needs (:func:`put_global`,
:func:`to_host`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
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
    ("layers", None),
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

    The device order follows the hardware topology: :func:`jax.make_mesh` lays the axes
    over the physical interconnect (ICI torus on TPU, NVLink islands on GPU) so that the
    innermost axes ('tensor', then 'fsdp') get the closest devices. On a multi-slice TPU
    job (devices with more than one ``slice_index``) the mesh is hybrid: the slices split
    the 'data' axis across the data-centre network (DCN), which then carries only the
    gradient all-reduce, and each slice's devices form the rest of the mesh over ICI.

    Args:
        data: size of the data-parallel axis; -1 takes all remaining devices.
        fsdp: size of the parameter-sharding axis.
        tensor: size of the tensor-parallel axis.
        devices: devices to use (default: all of ``jax.devices()``).
        num_devices: use only the first this many devices (-1 = all); mainly for tests
            and for restoring a checkpoint onto a smaller mesh. A subset is laid out in
            ``jax.devices()`` order, since it need not form a whole physical topology.

    Returns:
        The mesh.

    Raises:
        ValueError: if the axis sizes do not multiply to the number of devices, or the
            slices of a multi-slice job do not divide the 'data' axis.
    """
    explicit = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    if num_devices != -1:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist")
        devices, explicit = devices[:num_devices], num_devices < len(devices) or explicit
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
    shape = (data, fsdp, tensor)
    auto = (jax.sharding.AxisType.Auto,) * 3
    slices = num_slices(devices)
    if slices > 1:
        if data % slices:
            raise ValueError(
                f"mesh data={data} is not divisible by the {slices} slices of this job: the "
                "slices split the 'data' axis, so use a data size that is a multiple of "
                f"{slices} (e.g. data=-1 with fsdp x tensor dividing one slice's devices)"
            )
        grid = mesh_utils.create_hybrid_device_mesh(
            (data // slices, fsdp, tensor), (slices, 1, 1), devices
        )
        return Mesh(grid, MESH_AXES, axis_types=auto)
    if explicit:
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)
    return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)


def num_slices(devices: Sequence[Any]) -> int:
    """Number of TPU slices among ``devices`` (1 where devices carry no ``slice_index``)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


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


def put_global(tree: Any, sharding: Any) -> Any:
    """Places a pytree on ``sharding`` (one sharding or a matching tree of them).

    Host values must be the same on every process (seeds, labels, feature-network
    weights): each process supplies the shards it holds, which also works when the mesh
    spans devices of other processes, where ``jax.device_put`` of a host value does not.
    Values that already are ``jax.Array`` are resharded with ``jax.device_put``.
    """

    def put(x, s):
        if isinstance(x, jax.Array):
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put(x, sharding), tree)
    return jax.tree.map(put, tree, sharding)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) global array as one host numpy array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
