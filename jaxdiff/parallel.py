"""Meshes, shardings and host-local to global arrays: the one place devices are named.

jaxdiff uses a single :class:`jax.sharding.Mesh` with axes ``('data', 'fsdp', 'tensor')``
and *Auto* axis types (GSPMD / pjit semantics: jit with explicit in/out shardings). Batches
are split over ``('data', 'fsdp')``; params carry logical axis names (see
:data:`jaxdiff.models.LOGICAL_AXES`) mapped to mesh axes by rules, so the same model runs
data-parallel, FSDP or tensor-parallel by changing only the mesh shape and the rules.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.utils.rng import per_sample_keys

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


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """How long a multi-process job waits for a slow process before giving up (seconds).

    On a pod a slow host is normal (a long compile, a busy disk, a preempted VM coming
    back); these bound how slow it may be. JAX's coordination service aborts the whole job
    (SIGABRT) when one fires, so they are generous by default.

    Attributes:
        init: every process must connect to the coordinator within this (JAX default 300).
        heartbeat: a process whose heartbeats stop this long is declared dead and the job
            aborts (JAX default 100). Heartbeats come from a background thread, so only a
            stopped, swapping or starved process misses them.
        shutdown: at exit every process waits this long for the others to reach the
            shutdown barrier (JAX default 300): a process still training, saving or
            writing a grid when another finishes needs this much slack.
    """

    init: int = 600
    heartbeat: int = 300
    shutdown: int = 900

    @classmethod
    def from_env(cls, **overrides: int | None) -> Timeouts:
        """Defaults, then ``JAXDIFF_{INIT,HEARTBEAT,SHUTDOWN}_TIMEOUT``, then ``overrides``."""
        values = {}
        for field in dataclasses.fields(cls):
            env = os.environ.get(f"JAXDIFF_{field.name.upper()}_TIMEOUT")
            value = overrides.get(field.name)
            value = value if value is not None else (int(env) if env else field.default)
            if value < 1:
                raise ValueError(f"timeout {field.name}={value} must be >= 1 second")
            values[field.name] = value
        return cls(**values)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeouts: Timeouts | None = None,
) -> bool:
    """Starts JAX's distributed runtime when this is (or may be) a multi-process job.

    On TPU pods and SLURM, ``jax.distributed.initialize()`` detects everything itself;
    elsewhere pass the coordinator explicitly (or set ``JAXDIFF_COORDINATOR``,
    ``JAXDIFF_NUM_PROCESSES`` and ``JAXDIFF_PROCESS_ID``). Must run before any other JAX
    call. A single process with nothing to detect is left alone.

    Args:
        coordinator_address: ``host:port`` of process 0.
        num_processes: processes in the job.
        process_id: this process's index.
        timeouts: how long to wait for slow processes (default :meth:`Timeouts.from_env`).

    Returns:
        True if the distributed runtime was started.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAXDIFF_COORDINATOR")
    if num_processes is None and "JAXDIFF_NUM_PROCESSES" in env:
        num_processes = int(env["JAXDIFF_NUM_PROCESSES"])
    if process_id is None and "JAXDIFF_PROCESS_ID" in env:
        process_id = int(env["JAXDIFF_PROCESS_ID"])
    t = Timeouts.from_env() if timeouts is None else timeouts
    kwargs = dict(
        initialization_timeout=t.init,
        heartbeat_timeout_seconds=t.heartbeat,
        shutdown_timeout_seconds=t.shutdown,
    )
    if coordinator_address is not None:
        # CPU processes need a collectives backend to talk to each other; the setting only
        # affects CPU devices (asking for the backend here would start it too early).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
        return True
    if any(
        k in env for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
    ):
        jax.distributed.initialize(**kwargs)
        return True
    return False


def is_main_process() -> bool:
    """True on process 0: the only one that logs, writes images and shows progress."""
    return jax.process_index() == 0


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


@dataclasses.dataclass
class BatchedOutput:
    """What a :func:`make_sharded_generate` run returns (host arrays, ``num`` rows each).

    Attributes:
        samples: ``[num, ...]`` samples, or None when not kept.
        extras: per-sample outputs of ``extra_fn`` (e.g. evaluation features), by name.
        nfe: network evaluations per sample (the ``aux["nfe"]`` of ``generate``).
    """

    samples: np.ndarray | None
    extras: dict[str, np.ndarray]
    nfe: int


def make_sharded_generate(
    generate: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, dict]],
    *,
    mesh: Mesh,
    num: int,
    labels: Any,
    batch_size: int,
    param_shardings: Any = None,
    extra_fn: Callable[[Any, jax.Array], dict[str, jax.Array]] | None = None,
    extra_params: Any = None,
) -> Callable[..., BatchedOutput]:
    """Compiles ``generate`` once over global batches split across the mesh's batch axes.

    The one loop that draws many samples: sample ``j`` is seeded by
    ``fold_in(key(seed), j)`` (:func:`jaxdiff.utils.rng.per_sample_keys`), so the result
    depends neither on ``batch_size`` nor on the device count. Each global batch
    (``batch_size`` rounded up to a multiple of the ``data x fsdp`` shards) is one jitted
    call with explicit shardings: params as ``param_shardings`` (default replicated),
    labels, keys and outputs split over ``('data', 'fsdp')``. The last batch is padded
    with extra seeds whose outputs are dropped, so every call has one shape.

    Args:
        generate: ``generate(params, labels, keys) -> (samples, aux)``, pure; ``aux``
            holds ``"nfe"``.
        mesh: a mesh with ``('data', 'fsdp', ...)`` axes.
        num: number of samples.
        labels: ``[num]`` int labels handed to ``generate`` (zeros for unconditional).
        batch_size: global samples per call.
        param_shardings: shardings of ``params`` on ``mesh`` (a pytree or one sharding).
        extra_fn: optional ``extra_fn(extra_params, samples) -> {name: [B, ...]}`` run in
            the same jitted call (e.g. evaluation features next to the sampler).
        extra_params: ``extra_fn``'s params (replicated).

    Returns:
        ``run(params, seed, keep_samples=True) -> BatchedOutput``.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    labels = np.asarray(labels, np.int32)
    if labels.shape != (num,):
        raise ValueError(f"labels must have shape ({num},), got {labels.shape}")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = -(-min(batch_size, num) // shards) * shards
    num_batches = -(-num // batch)
    padded = np.resize(labels, num_batches * batch).astype(np.int32)
    b_sh, rep = batch_sharding(mesh), replicated(mesh)
    p_sh = rep if param_shardings is None else param_shardings

    def step(params, extra_params, seed, batch_labels, start):
        key = jax.random.key(seed)
        keys = jax.lax.with_sharding_constraint(per_sample_keys(key, batch, start), b_sh)
        x, aux = generate(params, batch_labels, keys)
        extras = {} if extra_fn is None else extra_fn(extra_params, x)
        return x, extras, aux["nfe"]

    jitted = jax.jit(
        step, in_shardings=(p_sh, rep, rep, b_sh, rep), out_shardings=(b_sh, b_sh, rep)
    )
    extra_params = put_global(extra_params, rep)
    label_batches = [
        put_global(padded[i * batch : (i + 1) * batch], b_sh) for i in range(num_batches)
    ]

    def run(params: Any, seed: int, keep_samples: bool = True) -> BatchedOutput:
        params = put_global(params, p_sh)
        seed = put_global(np.uint32(seed), rep)
        xs, extras, nfe = [], [], 0
        for i in range(num_batches):
            start = put_global(np.int32(i * batch), rep)
            x, e, n = jitted(params, extra_params, seed, label_batches[i], start)
            if keep_samples:
                xs.append(to_host(x))
            extras.append(jax.tree.map(to_host, e))
            nfe = int(n)
        merged = {k: np.concatenate([e[k] for e in extras])[:num] for k in extras[0]}
        samples = np.concatenate(xs)[:num] if keep_samples else None
        return BatchedOutput(samples, merged, nfe)

    return run


class DevicePrefetcher:
    """Keeps the next ``size`` global batches on the devices ahead of the step.

    Wraps a checkpointable host iterator (``next`` gives this process's numpy batch;
    ``get_state``/``set_state`` as :func:`jaxdiff.data.make_iterator`'s). Each batch is
    made a global array on ``mesh`` (:func:`global_batch`) as soon as it is read, so the
    host-to-device copy of batch ``t + 1`` overlaps step ``t`` and the host never stalls
    the device while a batch is ready. :meth:`get_state` is the state of the first batch
    not yet handed out, so a checkpoint taken between steps resumes exactly, whatever is
    still in flight.

    Args:
        iterator: the host batch iterator.
        mesh: the mesh whose batch axes split the batches.
        size: batches kept on the devices (2: one being consumed, one arriving).
        transform: applied to each host batch first (e.g. dropping keys the step ignores).
    """

    def __init__(
        self,
        iterator: Any,
        mesh: Mesh,
        size: int = 2,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"prefetch size={size} must be >= 1")
        self._iterator, self._mesh, self._size = iterator, mesh, size
        self._transform = transform or (lambda batch: batch)
        self._queue: collections.deque = collections.deque()

    def __iter__(self) -> DevicePrefetcher:
        return self

    def _fill(self) -> None:
        while len(self._queue) < self._size:
            state = self._iterator.get_state()
            try:
                host = next(self._iterator)
            except StopIteration:
                return
            self._queue.append((state, global_batch(self._transform(host), self._mesh)))

    def __next__(self) -> Any:
        self._fill()
        if not self._queue:
            raise StopIteration
        _, batch = self._queue.popleft()
        self._fill()  # start the next copies before the caller launches its step
        return batch

    def get_state(self) -> Any:
        """The host iterator's state at the first batch not yet returned."""
        return self._queue[0][0] if self._queue else self._iterator.get_state()

    def set_state(self, state: Any) -> None:
        """Drops the batches in flight and moves the host iterator to ``state``."""
        self._queue.clear()
        self._iterator.set_state(state)

    def start_prefetch(self) -> None:
        """Starts the host iterator's own read-ahead (e.g. its worker processes)."""
        if hasattr(self._iterator, "start_prefetch"):
            self._iterator.start_prefetch()

    def close(self) -> None:
        """Drops the batches in flight and closes the host iterator."""
        self._queue.clear()
        if hasattr(self._iterator, "close"):
            self._iterator.close()


def prefetch_to_mesh(
    iterator: Any, mesh: Mesh, size: int = 2, transform: Callable[[Any], Any] | None = None
) -> DevicePrefetcher:
    """Wraps a host batch iterator so ``size`` global batches wait on the devices.

    See :class:`DevicePrefetcher`. Example::

        batches = prefetch_to_mesh(make_iterator(source, global_batch_size=256), mesh)
        for _ in range(num_steps):
            state, metrics = train_step(state, next(batches), key)
    """
    return DevicePrefetcher(iterator, mesh, size, transform)
