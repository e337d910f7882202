"""Deterministic, checkpointable, per-process-sharded batch iterators built on grain.

:func:`make_iterator` turns any random-access source into an iterator of local batches.
Batch ``step`` is computed by ``fetch(step)``: the example indices of the batch with numpy,
one ``source.get_batch(indices)`` read, the optional ``transform`` and ``augment``. The
pipeline is ``grain.MapDataset.range(step, ...).map(fetch)``, run in the main process
(with threads for file sources) or in ``workers`` grain worker processes.

* **Shuffling.** Each epoch is a fresh permutation of all examples seeded by
  ``(seed, epoch)``. Global batches are cut from the concatenated epochs, so a batch may
  straddle an epoch boundary and no example is ever dropped.
* **Sharding.** With ``P`` processes, process ``p`` reads the contiguous slice
  ``[p L, (p + 1) L)`` of each global batch (``L = global_batch_size // P``) and only
  those examples. The global batch, assembled in process order, is the same for any
  ``P``: multi-host runs match single-host ones and can resume on another topology.
* **Checkpointing.** Batch ``step`` is a pure function of ``(seed, step)``, so the
  iterator state is just ``{"next_index": step}``, whatever the number of processes or
  workers: ``it.get_state()`` / ``it.set_state(state)`` resume the exact stream (also with
  another ``workers`` or ``process_count``), and ``grain.checkpoint.CheckpointSave(it)``
  works inside an orbax ``Composite``.

Augmentation protocol
---------------------
An augmentation is a callable ``augment(batch: Batch, keys: np.ndarray) -> Batch``:

* ``batch`` is this process's local batch after ``transform``; return a new dict (do not
  modify the input's arrays in place) with the same keys and batch size.
* ``keys`` is a ``uint64 [local_batch]`` array of per-example seeds:
  ``keys[i] = augment_keys(seed, step * global_batch_size + p L + i)``, a hash of the
  seed and the example's *global position in the endless stream*, not of the process or
  worker. Example ``i``'s randomness must depend on ``keys[i]`` only (e.g.
  ``np.random.default_rng(keys[i])`` or bits of the key), so the augmented global batch
  is the same for any topology and worker count, and a resumed run continues it exactly.
  Salt the key with a constant of your own before use (as :mod:`jaxdiff.data.augment`
  does), so that chained augmentations make independent choices.
* It must be picklable (a top-level function or a dataclass instance), because with
  ``workers > 0`` it runs in worker processes; keep captured state small, every worker
  receives a copy.

:func:`jaxdiff.data.augment.random_flip` (re-exported here) is the reference
implementation; :class:`jaxdiff.data.augment.EdmAugment` is EDM's augmentation pipe.
"""

from __future__ import annotations

import atexit
import functools
import weakref
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from absl import flags

from jaxdiff.data.augment import mix64, random_flip
from jaxdiff.data.sources import ArraySource, Batch, DataSource, stack_examples
from jaxdiff.errors import InvalidArgumentError

BatchTransform = Callable[[Batch], Batch]
#: ``(batch, keys) -> batch``; see the module docstring for the protocol.
Augmentation = Callable[[Batch, np.ndarray], Batch]

# "Infinite" number of steps; grain's range datasets need a finite length.
_ENDLESS_STEPS = 2**62
# Separates the augmentation key stream from any other use of the run seed.
_AUGMENT_DOMAIN = 0x61756720  # "aug "


@functools.lru_cache(maxsize=16)
def _key_base(seed: int) -> np.uint64:
    return np.random.SeedSequence([seed, _AUGMENT_DOMAIN]).generate_state(1, np.uint64)[0]


def augment_keys(seed: int, positions: np.ndarray) -> np.ndarray:
    """Per-example augmentation seeds of the examples at ``positions`` of the stream.

    Args:
        seed: The run seed given to :func:`make_iterator`.
        positions: Global positions in the endless example stream
            (``step * global_batch_size + index in the global batch``).

    Returns:
        ``uint64`` array shaped like ``positions``: the ``keys`` an augmentation receives.
    """
    return mix64(mix64(np.asarray(positions).astype(np.uint64)) ^ _key_base(seed))


class _BatchIndices:
    """Maps a step number to the stream positions and example indices of this process.

    One global order serves every topology: epoch ``e`` is a permutation of all examples
    drawn from ``(seed, e)``, global batch ``s`` is the next ``global_batch`` entries of
    that stream, and process ``p`` reads the contiguous slice ``[p L, (p + 1) L)`` of it.
    Assembled in process order, the global batch is therefore identical for any number of
    processes, so runs are reproducible across topologies and can resume on another one.
    """

    def __init__(
        self,
        *,
        num_examples: int,
        global_batch: int,
        seed: int,
        shuffle: bool,
        shard: int,
        shards: int,
    ) -> None:
        self._n = num_examples
        self._global = global_batch
        self._local = global_batch // shards
        self._offset = shard * self._local
        self._seed = seed
        self._shuffle = shuffle

    def positions(self, step: int) -> np.ndarray:
        return int(step) * self._global + self._offset + np.arange(self._local)

    def examples(self, positions: np.ndarray) -> np.ndarray:
        epoch, offset = np.divmod(positions, self._n)
        if not self._shuffle:
            return offset
        out = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epoch):
            mask = epoch == e
            out[mask] = _epoch_permutation(self._n, self._seed, int(e))[offset[mask]]
        return out


# Module-level so that it is thread-safe and nothing unpicklable hangs off the iterator. A
# batch touches at most two epochs unless it is longer than the dataset; a few more are
# kept because threads prefetch batches in parallel and several iterators may be live.
@functools.lru_cache(maxsize=8)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False
    return order


class _Fetch:
    """``step -> local batch``: what every thread or worker process runs.

    A top-level class (not a closure) so that it pickles by reference into workers.
    """

    def __init__(
        self,
        source: DataSource,
        indices: _BatchIndices,
        transform: BatchTransform | None,
        augment: Augmentation | None,
        seed: int,
    ) -> None:
        self.source = source
        self.indices = indices
        self.transform = transform
        self.augment = augment
        self.seed = seed

    def __call__(self, step: int) -> Batch:
        positions = self.indices.positions(step)
        idx = self.indices.examples(positions)
        if hasattr(self.source, "get_batch"):
            batch = self.source.get_batch(idx)
        else:
            batch = stack_examples([self.source[int(i)] for i in idx])
        if self.transform is not None:
            batch = self.transform(batch)
        if self.augment is not None:
            batch = self.augment(batch, augment_keys(self.seed, positions))
        return batch


# Iterators with live workers, closed at exit before module teardown: grain's own cleanup
# in __del__ would otherwise run after the modules it needs are gone and print errors.
_LIVE: weakref.WeakSet[BatchIterator] = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for it in list(_LIVE):
        it.close()


class BatchIterator(grain.DatasetIterator):
    """Checkpointable iterator over the batches of :func:`make_iterator`.

    It owns a grain pipeline that starts at the current step and rebuilds it on
    :meth:`set_state`, so its state is ``{"next_index": step}`` alone (grain's own
    multi-worker state would record the worker count). Workers start on the first
    ``next`` (or :meth:`start_prefetch`) and stop on :meth:`close`, on ``set_state`` and
    when the iterator is garbage collected.
    """

    def __init__(
        self, fetch: _Fetch, *, num_steps: int, workers: int, threads: int, prefetch: int
    ) -> None:
        super().__init__()
        self._fetch = fetch
        self._num_steps = num_steps
        self._workers = workers
        self._threads = threads
        self._prefetch = prefetch
        self._step = 0
        self._inner: grain.DatasetIterator | None = None

    def _build(self) -> grain.DatasetIterator:
        dataset = grain.MapDataset.range(self._step, self._num_steps).map(self._fetch)
        if self._workers == 0:
            options = grain.ReadOptions(
                num_threads=self._threads, prefetch_buffer_size=self._prefetch
            )
            return iter(dataset.to_iter_dataset(options))
        # grain 0.2.18 reads an absl flag when starting workers and fails if the program
        # never parsed flags (any script not run by absl.app; google/grain#1355). Parsing
        # later (absl.app.run) still works after this.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Each worker computes every ``workers``-th batch and grain interleaves them back
        # in order; the threads (if any) overlap file reads inside each worker.
        options = grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=self._threads)
        mp_options = grain.MultiprocessingOptions(
            num_workers=self._workers,
            per_worker_buffer_size=max(1, -(-self._prefetch // self._workers)),
        )
        _LIVE.add(self)
        return iter(dataset.to_iter_dataset(options).mp_prefetch(mp_options))

    def __next__(self) -> Batch:
        self._assert_not_closed()
        if self._step >= self._num_steps:
            raise StopIteration
        if self._inner is None:
            self._inner = self._build()
        batch = next(self._inner)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """``{"next_index": step}``: the number of batches produced so far."""
        return {"next_index": self._step}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes at ``state["next_index"]``, as returned by :meth:`get_state`.

        Raises:
            InvalidArgumentError: If ``state`` is not ``{"next_index": <int >= 0>}``.
        """
        step = state.get("next_index") if isinstance(state, dict) else None
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise InvalidArgumentError(
                f"data iterator state {state!r} is not {{'next_index': <step >= 0>}}: pass "
                "a state returned by get_state() of a make_iterator iterator"
            )
        if int(step) != self._step:  # the running pipeline (and its workers) stays valid
            self._close_inner()
            self._step = int(step)

    def start_prefetch(self) -> None:
        """Starts reading (and the workers) before the first ``next``."""
        self._assert_not_closed()
        if self._inner is None and self._step < self._num_steps:
            self._inner = self._build()
            self._inner.start_prefetch()

    def _close_inner(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None

    def close(self) -> None:
        """Stops the worker processes and threads; idempotent."""
        self._close_inner()
        self._closed = True

    def __str__(self) -> str:
        return (
            f"BatchIterator(next_index={self._step}, workers={self._workers}, "
            f"threads={self._threads}, prefetch={self._prefetch})"
        )


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when needed: explicit arguments keep this module jax-free

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise InvalidArgumentError(
            f"need 0 <= process_index < process_count, got process_index={process_index}, "
            f"process_count={process_count}"
        )
    return process_index, process_count


def _check_count(name: str, value: Any, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"{name}={value!r} must be an integer >= 0; {fix}")


def make_iterator(
    source: DataSource,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    transform: BatchTransform | None = None,
    augment: Augmentation | None = None,
    workers: int = 0,
    threads: int | None = None,
    prefetch: int | None = None,
) -> BatchIterator:
    """Builds a deterministic, checkpointable iterator of this process's batches.

    Args:
        source: Random-access source (``__len__``, ``__getitem__``; ``get_batch`` is used
            when present), e.g. from :func:`.registry.get_dataset`.
        global_batch_size: Batch size summed over all processes.
        seed: Non-negative seed for the shuffle order and the augmentation keys.
        shuffle: Whether to reshuffle every epoch; if ``False``, source order is kept.
        num_epochs: Passes over the data; ``None`` repeats forever. A finite run yields
            ``num_epochs * len(source) // global_batch_size`` batches (epochs run into
            each other inside a batch, as in the endless stream).
        process_index: This process; defaults to ``jax.process_index()``.
        process_count: Number of processes; defaults to ``jax.process_count()``.
        transform: Optional deterministic ``batch -> batch`` function applied to every
            local batch on the host (in the workers when ``workers > 0``).
        augment: Optional ``(batch, keys) -> batch`` augmentation following the protocol
            of the module docstring (e.g. :func:`random_flip`), applied after
            ``transform``; keys come from the seed and each example's global position.
        workers: Worker processes that read, decode, transform and augment batches; 0
            does it all in this process. Use workers for CPU-heavy sources (image
            decoding); an in-memory :class:`ArraySource` gains nothing (each worker gets
            a copy of its arrays). The source, ``transform`` and ``augment`` must pickle.
        threads: Reading threads per process (this one, or each worker). Defaults: 0 for
            an in-memory :class:`ArraySource`, 8 for other sources with ``workers=0``
            (file reads; Pillow decodes outside the GIL), 0 in workers.
        prefetch: Batches prepared ahead of the consumer, in total over the workers.
            Defaults: 0 for an in-memory source read in this process, 16 with threads,
            ``2 * workers`` with workers.

    Returns:
        A :class:`BatchIterator` (a grain ``DatasetIterator``) yielding local batches
        ``{"image": [global_batch_size // process_count, ...], "label": int32 [...]}``;
        ``get_state()`` is ``{"next_index": step}`` (JSON), ``set_state(state)`` resumes
        with any ``workers`` / ``process_count``, orbax works via
        ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``, and ``close()``
        stops the workers.

    Raises:
        InvalidArgumentError: If the batch size does not divide evenly over processes,
            the source is empty, or another argument is invalid.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % process_count:
        suggestion = max(1, -(-global_batch_size // process_count)) * process_count
        raise InvalidArgumentError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count} (each process loads an equal share); use "
            f"e.g. global_batch_size={suggestion}"
        )
    if seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative integer, got {seed}")
    for name, fn in (("transform", transform), ("augment", augment)):
        if fn is not None and not callable(fn):
            raise InvalidArgumentError(
                f"{name}={fn!r} is not callable: pass a function such as random_flip"
            )
    _check_count("workers", workers, "use 0 to read in this process")
    in_memory = isinstance(source, ArraySource)
    if threads is None:
        threads = 8 if workers == 0 and not in_memory else 0
    if prefetch is None:
        prefetch = 2 * workers if workers else (16 if threads else 0)
    _check_count("threads", threads, "use 0 for no reading threads")
    _check_count("prefetch", prefetch, "use 0 for no prefetching")
    num_examples = len(source)
    if num_examples == 0:
        raise InvalidArgumentError("source has no examples: pass a non-empty dataset")
    if num_epochs is None:
        num_steps = _ENDLESS_STEPS
    elif num_epochs < 1 or (num_steps := num_epochs * num_examples // global_batch_size) == 0:
        raise InvalidArgumentError(
            f"num_epochs={num_epochs} over {num_examples} examples gives no full global "
            f"batch of {global_batch_size}; use num_epochs=None or a smaller batch"
        )
    indices = _BatchIndices(
        num_examples=num_examples,
        global_batch=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        shard=process_index,
        shards=process_count,
    )
    fetch = _Fetch(source, indices, transform, augment, seed)
    return BatchIterator(
        fetch, num_steps=num_steps, workers=workers, threads=threads, prefetch=prefetch
    )


__all__ = [
    "Augmentation",
    "BatchIterator",
    "BatchTransform",
    "augment_keys",
    "make_iterator",
    "random_flip",
]
