"""Offline datasets and deterministic, checkpointable grain input pipelines.

Typical use::

    source = get_dataset("digits")  # or "toy_gmm", "moons", "cifar10", "tfds:<name>"
    it = make_iterator(source, global_batch_size=128, seed=0)
    batch = next(it)  # {"image": float32 [128 // process_count, 8, 8, 1], "label": int32}
    state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes exactly

The data tensor is always under ``"image"`` (2-D toy points too), so training code is
the same for every dataset.
"""

from jaxdiff.data.arrays import NpySource
from jaxdiff.data.augment import AUGMENT_LABEL, EdmAugment, random_flip
from jaxdiff.data.digits import load_digits
from jaxdiff.data.imagefolder import CorruptImageError, ImageFolderSource
from jaxdiff.data.latents import LatentAugment, LatentSource, write_latents
from jaxdiff.data.pipeline import Augmentation, BatchIterator, augment_keys, make_iterator
from jaxdiff.data.registry import TOY_SPLIT_SIZES, dataset_names, get_dataset
from jaxdiff.data.shard_writer import write_arrays
from jaxdiff.data.shards import ArrayRecordSource, ShardError
from jaxdiff.data.sources import ArraySource, Batch, DatasetInfo, DataSource, stack_examples
from jaxdiff.data.tfds_source import (
    KNOWN_TFDS,
    TFDS_ALIASES,
    DatasetNotPreparedError,
    TfdsSource,
    TfdsSpec,
    load_tfds,
)
from jaxdiff.data.toys import (
    GaussianMixture,
    checkerboard_log_prob,
    gaussian_mixture_log_prob,
    ring_gaussian_mixture,
    sample_checkerboard,
    sample_gaussian_mixture,
    sample_two_moons,
)

__all__ = [
    "AUGMENT_LABEL",
    "KNOWN_TFDS",
    "TFDS_ALIASES",
    "TOY_SPLIT_SIZES",
    "ArrayRecordSource",
    "ArraySource",
    "Augmentation",
    "Batch",
    "BatchIterator",
    "CorruptImageError",
    "DataSource",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "EdmAugment",
    "GaussianMixture",
    "ImageFolderSource",
    "LatentAugment",
    "LatentSource",
    "NpySource",
    "ShardError",
    "TfdsSource",
    "TfdsSpec",
    "augment_keys",
    "checkerboard_log_prob",
    "dataset_names",
    "gaussian_mixture_log_prob",
    "get_dataset",
    "load_digits",
    "load_tfds",
    "make_iterator",
    "random_flip",
    "ring_gaussian_mixture",
    "sample_checkerboard",
    "sample_gaussian_mixture",
    "sample_two_moons",
    "stack_examples",
    "write_arrays",
    "write_latents",
]
