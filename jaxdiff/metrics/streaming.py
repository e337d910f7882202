"""Reference statistics streamed from a data source: one batch in memory at a time.

:func:`reference_statistics` reads a source in order, in global batches; each process
reads only its own slice of every batch, features are computed by one jitted call per
batch sharded over the mesh's ``('data', 'fsdp')`` axes, and the mean and covariance are
accumulated on the host in float64 (:class:`~jaxdiff.metrics.statistics.RunningStatistics`).
Neither the images nor the features of the whole set are ever held, so it scales to
ImageNet-size reference sets. :func:`save_reference_statistics` is the one-call version
for images already in memory; ``python -m jaxdiff.metrics.reference_stats`` is the
command-line one.

Example::

    source = get_dataset("cifar10", data_dir="gs://bucket/tfds")
    stats = reference_statistics(source, feature_evaluator("fid"), batch_size=500)
    stats.save("gs://bucket/stats/cifar10_train.npz")
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.typing import ArrayLike

from jaxdiff.data.sources import stack_examples
from jaxdiff.metrics.evaluate import get_evaluator, progress_bar
from jaxdiff.metrics.evaluator import Evaluator, Features
from jaxdiff.metrics.fd_dinov2 import dinov2_feature_fn, dinov2_feature_name, load_dinov2_weights
from jaxdiff.metrics.inception import load_inception_variables
from jaxdiff.metrics.inception_eval import INCEPTION_FEATURE, inception_feature_fn
from jaxdiff.metrics.statistics import ReferenceStatistics, RunningStatistics
from jaxdiff.metrics.weights import arrays_to_bytes
from jaxdiff.parallel import (
    batch_sharding,
    is_main_process,
    make_mesh,
    put_global,
    replicated,
    to_host,
)

FeatureFn = Callable[[Any, jax.Array], Any]
"""``feature_fn(params, images [B, ...]) -> [B, ...]`` or ``{name: [B, ...]}``, pure."""
FEATURE_EVALUATORS = ("fid", "fd_digits", "fd_dinov2")
"""Evaluators :func:`feature_evaluator` (and the command) make reference statistics for."""


def feature_evaluator(name: str, **kwargs: Any) -> Evaluator:
    """An evaluator whose features describe real data: what reference statistics need.

    Unlike :func:`~jaxdiff.metrics.get_evaluator`, ``"fid"`` needs no reference
    statistics here (they are what is being made).

    Args:
      name: ``"fid"``, ``"fd_digits"`` or ``"fd_dinov2"``.
      **kwargs: ``"fid"``: ``inception_weights=`` (default ``$JAXDIFF_INCEPTION_WEIGHTS``),
        ``expected_sha256=``, ``input_range=``, ``quantize=``; ``"fd_digits"``:
        ``classifier=``; ``"fd_dinov2"``: ``dinov2_weights=`` (default
        ``$JAXDIFF_DINOV2_WEIGHTS``), ``input_range=``, ``quantize=``.

    Raises:
      ValueError: For another name, listing the known ones.
      InceptionWeightsNotFoundError: For ``"fid"`` without weights, saying how to get them.
    """
    if name == "fid":
        weights = kwargs.pop("inception_weights", None)
        sha = {k: kwargs.pop(k) for k in ("expected_sha256",) if k in kwargs}
        opts = {"input_range": "minus_one_one", "quantize": True}
        unknown = sorted(set(kwargs) - set(opts))
        if unknown:
            raise ValueError(
                f"unknown 'fid' options {unknown}: use inception_weights, expected_sha256, "
                "input_range, quantize"
            )
        variables = load_inception_variables(weights, **sha)
        opts.update(kwargs)
        fn = inception_feature_fn(opts["input_range"], opts["quantize"])
        return Evaluator("fid", variables, fn, _features_only, 50, INCEPTION_FEATURE)
    if name == "fd_digits":
        return get_evaluator("fd_digits", **kwargs)
    if name == "fd_dinov2":
        params, config = load_dinov2_weights(kwargs.pop("dinov2_weights", None))
        opts = {"input_range": "minus_one_one", "quantize": True}
        unknown = sorted(set(kwargs) - set(opts))
        if unknown:
            raise ValueError(
                f"unknown 'fd_dinov2' options {unknown}: use dinov2_weights, input_range, quantize"
            )
        opts.update(kwargs)
        fn = dinov2_feature_fn(config, opts["input_range"], opts["quantize"])
        return Evaluator("fd_dinov2", params, fn, _features_only, 50, dinov2_feature_name(config))
    raise ValueError(
        f"no reference statistics for evaluator {name!r}: choose one of {list(FEATURE_EVALUATORS)}"
    )


def _features_only(features: Features, labels: Any) -> dict[str, float]:
    raise ValueError(
        "this evaluator only computes features (for reference statistics); build one that "
        "computes metrics with get_evaluator('fid', reference_stats=...)"
    )


class _Images:
    """An in-memory ``[N, ...]`` array as a source (dtype kept: uint8 stays uint8)."""

    def __init__(self, images: ArrayLike) -> None:
        self._images = np.asarray(images)
        if self._images.ndim < 1:
            raise ValueError(f"images must be an array [N, ...], got shape {self._images.shape}")

    def __len__(self) -> int:
        return len(self._images)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"image": self._images[indices]}


def read_batch(source: Any, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples ``indices`` of a source, stacked: one ``get_batch`` call when there is one."""
    if hasattr(source, "get_batch"):
        return source.get_batch(indices)
    return stack_examples([source[int(i)] for i in indices])


def _read(source: Any, indices: np.ndarray) -> np.ndarray:
    """The ``"image"`` arrays of ``indices``."""
    batch = read_batch(source, indices)
    if "image" not in batch:
        raise ValueError(f"the source's examples have no 'image' key (keys: {sorted(batch)})")
    return np.asarray(batch["image"])


def process_slice(
    start: int, batch: int, end: int, process: int, processes: int
) -> tuple[np.ndarray, int]:
    """The example indices one process reads of the global batch at ``start``.

    Process ``p`` reads the contiguous slice ``[start + p L, start + (p + 1) L)`` with
    ``L = batch / processes``, clipped at ``end``: together the processes read each
    example of the batch once, and the rest of the slice is padding.

    Returns:
      ``(indices, L)``: the valid indices (possibly none) and the slice length.
    """
    local = batch // processes
    first = start + process * local
    return np.arange(first, min(first + local, end), dtype=np.int64), local


@functools.lru_cache(maxsize=16)
def _compiled(feature_fn: FeatureFn, keys: tuple[str, ...], mesh: Mesh) -> Callable:
    rep, b_sh = replicated(mesh), batch_sharding(mesh)

    def step(params, x):
        out = feature_fn(params, x)
        feats = [out[k] for k in keys] if isinstance(out, dict) else [out]
        return tuple(f.reshape(f.shape[0], -1) for f in feats)

    return jax.jit(step, in_shardings=(rep, b_sh), out_shardings=b_sh)


def reference_statistics(
    source: Any,
    evaluator: Evaluator | FeatureFn,
    *,
    batch_size: int = 256,
    mesh: Mesh | None = None,
    num: int | None = None,
    progress: bool = True,
    feature_params: Any = None,
    key: str | tuple[str, ...] = "features",
    description: str | None = None,
) -> ReferenceStatistics | dict[str, ReferenceStatistics]:
    """Streams a data source through a feature network; returns float64 ``mu``/``sigma``.

    Examples ``0 .. num - 1`` are read in order in global batches of ``batch_size``
    (rounded up to a multiple of the ``data x fsdp`` shards and of the process count).
    Each process reads only its slice of a batch (:func:`process_slice`) with one
    ``source.get_batch(indices)`` call (else ``source[i]`` per example); the last batch is
    padded, and the padding is masked out. Features come from one jitted call per batch
    with the batch split over the mesh; while the devices work on a batch the host reads
    the next one and accumulates the previous one. Every process ends with the same
    statistics.

    Args:
      source: A random-access source (``__len__`` and ``get_batch`` or ``__getitem__``
        returning ``{"image": ...}``; any :func:`jaxdiff.data.get_dataset` source), or an
        ``[N, ...]`` array of images.
      evaluator: An :class:`Evaluator` (e.g. :func:`feature_evaluator`), or a pure
        ``feature_fn(feature_params, images [B, ...]) -> [B, ...] or {key: [B, ...]}``.
      batch_size: Global examples per call.
      mesh: Device mesh; default all devices (:func:`jaxdiff.parallel.make_mesh`).
      num: Use the first ``num`` examples (None: all).
      progress: Show a progress bar (process 0, on a terminal).
      feature_params: Params of a plain ``feature_fn`` (an Evaluator has its own).
      key: Which output of a dict-returning feature function to describe, or a tuple of
        outputs to describe in the same pass (e.g. ``("features", "spatial")``).
      description: What the data is, stored as ``source`` (default from ``source.info``).

    Returns:
      The statistics, with ``num``, ``evaluator``, ``feature``, ``image_shape`` and
      ``source`` filled in; for a tuple ``key``, ``{key: statistics}``.

    Raises:
      ValueError: For fewer than 2 examples or a batch size below 1.
    """
    if isinstance(source, np.ndarray | jax.Array | list):
        source = _Images(source)
    total = len(source)
    num = total if num is None else int(num)
    if num > total:
        raise ValueError(
            f"num={num} is more than the {total} examples of the source: use num <= {total} "
            "(None: all)"
        )
    if num < 2:
        raise ValueError(f"statistics need at least 2 examples, got num={num}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mesh = make_mesh() if mesh is None else mesh
    if isinstance(evaluator, Evaluator):
        fn, params, meta = evaluator.feature_fn, evaluator.feature_params, evaluator
    else:
        fn, params, meta = evaluator, feature_params, None
    processes, process = jax.process_count(), jax.process_index()
    multiple = int(np.lcm(mesh.shape["data"] * mesh.shape["fsdp"], processes))
    batch = -(-min(batch_size, num) // multiple) * multiple
    keys = key if isinstance(key, tuple) else (key,)
    step = _compiled(fn, keys, mesh)
    params = put_global(params, replicated(mesh))
    b_sh = batch_sharding(mesh)
    # Padding rows need an image of the right shape and dtype; one read gives both.
    template = _read(source, np.zeros(1, np.int64))
    accs = [RunningStatistics() for _ in keys]
    bar = progress_bar(num, progress, "reference statistics", "img")

    def launch(start: int) -> tuple[jax.Array, jax.Array]:
        idx, local = process_slice(start, batch, num, process, processes)
        images = _read(source, idx) if len(idx) else template[:0]
        pad = np.zeros((local - len(idx), *template.shape[1:]), template.dtype)
        valid = np.arange(local) < len(idx)
        x = jax.make_array_from_process_local_data(b_sh, np.concatenate([images, pad]))
        # The mask travels with the rows, so whatever order the devices hold them in,
        # exactly the padding is dropped.
        mask = jax.make_array_from_process_local_data(b_sh, valid)
        return step(params, x), mask

    def accumulate(pending: tuple[tuple[jax.Array, ...], jax.Array]) -> None:
        keep = to_host(pending[1]).astype(bool)
        for acc, feats in zip(accs, pending[0], strict=True):
            acc.update(to_host(feats)[keep])
        bar.update(int(keep.sum()))

    pending = None
    try:
        for start in range(0, num, batch):
            current = launch(start)  # dispatch is asynchronous: the devices start now
            if pending is not None:
                accumulate(pending)
            pending = current
        accumulate(pending)
    finally:
        bar.close()
    info = getattr(source, "info", None)
    if description is None:
        description = f"{info.name} split={info.split}" if info is not None else "array"
    if num < total:
        description += f" (first {num} of {total})"
    meta_fields = dict(
        evaluator=meta.name if meta else "",
        image_shape=tuple(template.shape[1:]),
        source=description,
    )
    feature = meta.feature_name if meta else ""
    if not isinstance(key, tuple):
        return ReferenceStatistics.from_running(accs[0], feature=feature, **meta_fields)
    return {
        k: ReferenceStatistics.from_running(
            acc, feature=feature if k == "features" else k, **meta_fields
        )
        for k, acc in zip(keys, accs, strict=True)
    }


def save_reference_statistics(
    name: str | Evaluator,
    samples: Any,
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    batch_size: int | None = None,
    description: str | None = None,
    **kwargs: Any,
) -> str:
    """Writes the statistics of an evaluator's ``"features"`` of real data.

    Streams through :func:`reference_statistics`, so ``samples`` may also be a data
    source too large for memory. For ``"fid"`` only the Inception weights are needed
    (``inception_weights=`` or ``$JAXDIFF_INCEPTION_WEIGHTS``).

    Args:
      name: ``"fid"``, ``"fd_digits"`` or an :class:`Evaluator` with a ``"features"`` output.
      samples: ``[N, ...]`` real images (same range convention as generated samples), or
        a data source.
      path: Output ``.npz``, local or a bucket URL (format: :mod:`jaxdiff.metrics.statistics`).
      mesh: Device mesh (default: all devices).
      batch_size: Global images per call (default: the evaluator's).
      description: What the data is (stored as ``source``).
      **kwargs: Evaluator options (:func:`feature_evaluator`).

    Returns:
      The SHA-256 of the written file (every process computes it; process 0 writes).
    """
    evaluator = name if isinstance(name, Evaluator) else feature_evaluator(name, **kwargs)
    stats = reference_statistics(
        samples,
        evaluator,
        batch_size=evaluator.batch_size if batch_size is None else batch_size,
        mesh=mesh,
        progress=False,
        description=description,
    )
    if is_main_process():
        return stats.save(path)
    return hashlib.sha256(arrays_to_bytes(stats.to_arrays())).hexdigest()
