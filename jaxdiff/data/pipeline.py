"""Deterministic, checkpointable, per-process-sharded batch iterators built on grain.

:func:`make_iterator` turns any random-access source into a grain ``DatasetIterator``
of local batches. The pipeline is ``grain.MapDataset.range(num_steps).map(fetch)``,
where ``fetch(step)`` computes the example indices of batch ``step`` with numpy and
reads them in one call:

* **Shuffling.** Each epoch is a fresh permutation of all examples seeded by
  ``(seed, epoch)``. Global batches are cut from the concatenated epochs, so a batch may
  straddle an epoch boundary and no example is ever dropped.
* **Sharding.** With ``P`` processes, process ``p`` reads the contiguous slice
  ``[p L, (p + 1) L)`` of each global batch (``L = global_batch_size // P``) and only
  those examples. The global batch, assembled in process order, is the same for any
  ``P``: multi-host runs match single-host ones and can resume on another topology.
* **Checkpointing.** Batch ``step`` is a pure function of ``(seed, step)``, so the
  iterator state is just ``{"next_index": step}``: ``it.get_state()`` /
  ``it.set_state(state)`` resume the exact order, and
  ``grain.checkpoint.CheckpointSave(it)`` works inside an orbax ``Composite``.

Vectorised gathers (one ``source.get_batch(indices)`` per batch, 2 orders of magnitude
faster than grain's per-element shuffle for in-memory data) keep host work small.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import grain
import numpy as np

from jaxdiff.data import digits, toys
from jaxdiff.data.sources import ArraySource, Batch, DataSource, stack_examples
from jaxdiff.data.tfds_source import KNOWN_TFDS, TFDS_ALIASES, load_tfds

BatchTransform = Callable[[Batch], Batch]
RandomBatchTransform = Callable[[Batch, np.random.Generator], Batch]

# "Infinite" number of steps; grain's range datasets need a finite length.
_ENDLESS_STEPS = 2**62


class _BatchIndices:
    """Maps a step number to the example indices of this process's part of the batch.

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
        # A batch touches at most two epochs unless it is longer than the dataset; a small
        # cache avoids recomputing the permutation (per thread, grain prefetches batches
        # in parallel, so a couple of epochs can be live at once).
        self._order = functools.lru_cache(maxsize=4)(self._epoch_order)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self._shuffle:
            return np.arange(self._n)
        return np.random.default_rng([self._seed, epoch]).permutation(self._n)

    def __call__(self, step: int) -> np.ndarray:
        pos = int(step) * self._global + self._offset + np.arange(self._local)
        epoch, offset = np.divmod(pos, self._n)
        out = np.empty(self._local, dtype=np.int64)
        for e in np.unique(epoch):
            mask = epoch == e
            out[mask] = self._order(int(e))[offset[mask]]
        return out


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when needed: explicit arguments keep this module jax-free

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got process_index={process_index}, "
            f"process_count={process_count}"
        )
    return process_index, process_count


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
    random_transform: RandomBatchTransform | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Builds a deterministic, checkpointable iterator of this process's batches.

    Args:
        source: Random-access source (``__len__``, ``__getitem__``; ``get_batch`` is used
            when present), e.g. from :func:`get_dataset`.
        global_batch_size: Batch size summed over all processes.
        seed: Non-negative seed for the shuffle order (and ``random_transform``).
        shuffle: Whether to reshuffle every epoch; if ``False``, source order is kept.
        num_epochs: Passes over the data; ``None`` repeats forever. A finite run yields
            ``num_epochs * len(source) // global_batch_size`` batches (epochs run into
            each other inside a batch, as in the endless stream).
        process_index: This process; defaults to ``jax.process_index()``.
        process_count: Number of processes; defaults to ``jax.process_count()``.
        transform: Optional deterministic ``batch -> batch`` function applied to every
            local batch on the host.
        random_transform: Optional ``(batch, np.random.Generator) -> batch`` (e.g.
            :func:`random_flip_left_right`); its generator is seeded by ``seed``, the
            process and the step, so it is reproducible and checkpoint-safe.
        read_options: grain prefetch settings. Defaults: no threads for in-memory
            :class:`ArraySource` (a gather is microseconds), 8 threads and 16 batches of
            prefetch for other sources (file reads).

    Returns:
        A grain ``DatasetIterator`` yielding local batches ``{"image": float32
        [global_batch_size // process_count, ...], "label": int32 [...]}``; it supports
        ``get_state()`` / ``set_state(state)`` (a JSON-serialisable dict) and orbax via
        ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``.

    Raises:
        ValueError: If the batch size does not divide evenly over processes, the source
            is smaller than the number of processes, or another argument is invalid.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % process_count:
        suggestion = max(1, -(-global_batch_size // process_count)) * process_count
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count} (each process loads an equal share); use "
            f"e.g. global_batch_size={suggestion}"
        )
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    num_examples = len(source)
    if num_examples == 0:
        raise ValueError("source has no examples")
    if num_epochs is None:
        num_steps = _ENDLESS_STEPS
    elif num_epochs < 1 or (num_steps := num_epochs * num_examples // global_batch_size) == 0:
        raise ValueError(
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

    def fetch(step: int) -> Batch:
        idx = indices(step)
        if hasattr(source, "get_batch"):
            batch = source.get_batch(idx)
        else:
            batch = stack_examples([source[int(i)] for i in idx])
        return batch if transform is None else transform(batch)

    dataset = grain.MapDataset.range(num_steps).map(fetch)
    if random_transform is not None:
        # Fold the process in so that processes do not draw identical augmentations.
        aug_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
        dataset = dataset.random_map(random_transform, seed=aug_seed)
    if read_options is None:
        in_memory = isinstance(source, ArraySource)
        read_options = grain.ReadOptions(
            num_threads=0 if in_memory else 8, prefetch_buffer_size=0 if in_memory else 16
        )
    return iter(dataset.to_iter_dataset(read_options))


def random_flip_left_right(batch: Batch, rng: np.random.Generator) -> Batch:
    """Flips each image of an ``[B, H, W, C]`` batch horizontally with probability 1/2.

    Args:
        batch: Batch with an ``"image"`` entry of rank 4.
        rng: Generator (supplied by :func:`make_iterator`'s ``random_transform``).

    Returns:
        A new batch dict with some images mirrored; other entries are unchanged.
    """
    image = batch["image"]
    flip = rng.random(image.shape[0]) < 0.5
    return {**batch, "image": np.where(flip[:, None, None, None], image[:, :, ::-1], image)}


#: Points pre-sampled per split for the 2-D toys (fixed seeds; see :func:`get_dataset`).
TOY_SPLIT_SIZES = {"train": 100_000, "test": 10_000}
_TOY_SAMPLERS: dict[str, Callable[[int, int], tuple[np.ndarray, np.ndarray]]] = {
    "toy_gmm": lambda n, seed: toys.sample_gaussian_mixture(n, seed),
    "moons": lambda n, seed: toys.sample_two_moons(n, seed),
    "checkerboard": lambda n, seed: toys.sample_checkerboard(n, seed),
}
_TOY_NUM_CLASSES = {"toy_gmm": 8, "moons": 2, "checkerboard": 2}
_ALIASES = {"gmm": "toy_gmm"}
#: ``"synthetic_latents"``: fixed random 32x32x4 "latents" with 1000 classes, for DiT
#: throughput runs that need no data (the values carry no signal).
SYNTHETIC_LATENTS = {"num_examples": 4096, "shape": (32, 32, 4), "num_classes": 1000}


def _synthetic_latents(split: str) -> ArraySource:
    rng = np.random.default_rng(0 if split == "train" else 1)
    n, shape, classes = (SYNTHETIC_LATENTS[k] for k in ("num_examples", "shape", "num_classes"))
    image = rng.standard_normal((n, *shape), dtype=np.float32)
    label = rng.integers(0, classes, n).astype(np.int32)
    return ArraySource(image, label, name="synthetic_latents", split=split, num_classes=classes)


def dataset_names() -> list[str]:
    """Names accepted by :func:`get_dataset` (besides any ``"tfds:<name>"``)."""
    return sorted(
        ["digits", "synthetic_latents", *_TOY_SAMPLERS, *_ALIASES, *KNOWN_TFDS, *TFDS_ALIASES]
    )


def get_dataset(name: str, *, split: str = "train", data_dir: str | None = None) -> DataSource:
    """Returns a dataset split as a random-access source with ``.info`` metadata.

    * ``"digits"``: scikit-learn 8x8 digits, ``[8, 8, 1]`` in [-1, 1], 10 classes; splits
      ``"train"`` / ``"test"`` / ``"all"`` (see :mod:`jaxdiff.data.digits`).
    * ``"toy_gmm"`` (alias ``"gmm"``), ``"moons"``, ``"checkerboard"``: 2-D toys with
      default parameters (:func:`jaxdiff.data.toys.ring_gaussian_mixture` etc.), stored
      as ``"image"`` ``[2]``. Finite sets pre-sampled with fixed seeds: 100,000 points for
      ``"train"`` (seed 0), 10,000 for ``"test"`` (seed 1).
    * ``"synthetic_latents"``: 4,096 fixed random ``[32, 32, 4]`` arrays with 1,000 labels,
      for throughput runs of latent models without data.
    * Known TFDS names (``"cifar10"``, ``"mnist"``, ``"imagenet_resized/32x32"``, ...) and
      ``"tfds:<any tfds name>"``: read from ``data_dir`` via :func:`load_tfds`.

    Args:
        name: Dataset name; see :func:`dataset_names`.
        split: Split name (any TFDS split string for TFDS datasets).
        data_dir: Prepared TFDS data folder (TFDS datasets only).

    Returns:
        A source for :func:`make_iterator`; ``source.info`` holds ``image_shape``,
        ``num_classes`` and ``num_examples``.

    Raises:
        ValueError: If the name or split is unknown.
        DatasetNotPreparedError: If a TFDS dataset is not prepared in ``data_dir``.
    """
    canonical = _ALIASES.get(name, name)
    if canonical == "digits":
        images, labels = digits.load_digits(split)
        return ArraySource(
            images, labels, name="digits", split=split, num_classes=digits.NUM_CLASSES
        )
    if canonical == "synthetic_latents":
        return _synthetic_latents(split)
    if canonical in _TOY_SAMPLERS:
        if split not in TOY_SPLIT_SIZES:
            raise ValueError(
                f"unknown split {split!r} for {name!r}; use one of {[*TOY_SPLIT_SIZES]}"
            )
        seed = 0 if split == "train" else 1
        points, labels = _TOY_SAMPLERS[canonical](TOY_SPLIT_SIZES[split], seed)
        return ArraySource(
            points, labels, name=canonical, split=split, num_classes=_TOY_NUM_CLASSES[canonical]
        )
    if canonical.startswith("tfds:"):
        return load_tfds(canonical.removeprefix("tfds:"), split=split, data_dir=data_dir)
    if canonical in KNOWN_TFDS or canonical in TFDS_ALIASES:
        return load_tfds(canonical, split=split, data_dir=data_dir)
    raise ValueError(
        f"unknown dataset {name!r}; known names: {dataset_names()}, or 'tfds:<name>' for "
        "any other TFDS dataset"
    )
