"""Dataset names: :func:`get_dataset` turns a name (and a path) into a random-access source."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxdiff.data import digits, toys
from jaxdiff.data.arrays import NpySource
from jaxdiff.data.sources import ArraySource, DataSource
from jaxdiff.data.tfds_source import KNOWN_TFDS, TFDS_ALIASES, load_tfds
from jaxdiff.errors import InvalidArgumentError

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
        [
            "arrayrecord",
            "digits",
            "imagefolder",
            "latents",
            "npy",
            "synthetic_latents",
            *_TOY_SAMPLERS,
            *_ALIASES,
            *KNOWN_TFDS,
            *TFDS_ALIASES,
        ]
    )


def get_dataset(
    name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    path: str | None = None,
    image_size: int | None = None,
    skip_corrupt: bool = False,
    latents: str = "sample",
    latent_flip: bool | None = None,
    latent_scale: Any = None,
    latent_shift: Any = None,
) -> DataSource:
    """Returns a dataset split as a random-access source with ``.info`` metadata.

    * ``"digits"``: scikit-learn 8x8 digits, ``[8, 8, 1]`` in [-1, 1], 10 classes; splits
      ``"train"`` / ``"test"`` / ``"all"`` (see :mod:`jaxdiff.data.digits`).
    * ``"toy_gmm"`` (alias ``"gmm"``), ``"moons"``, ``"checkerboard"``: 2-D toys with
      default parameters (:func:`jaxdiff.data.toys.ring_gaussian_mixture` etc.), stored
      as ``"image"`` ``[2]``. Finite sets pre-sampled with fixed seeds: 100,000 points for
      ``"train"`` (seed 0), 10,000 for ``"test"`` (seed 1).
    * ``"synthetic_latents"``: 4,096 fixed random ``[32, 32, 4]`` arrays with 1,000 labels,
      for throughput runs of latent models without data.
    * ``"npy"``: arrays from ``path``, a ``.npy`` file ``[N, *shape]`` or a folder with
      ``images.npy`` and optional ``labels.npy``, returned as float32 exactly as stored
      (:class:`jaxdiff.data.arrays.NpySource`; memory-mapped when local).
    * ``"imagefolder"``: images under ``path`` (``<class>/<image>`` subfolders, or flat and
      unlabelled), decoded and center-cropped to ``image_size`` as ADM does
      (:class:`jaxdiff.data.imagefolder.ImageFolderSource`).
    * ``"arrayrecord"``: a dataset prepared by ``python -m jaxdiff.data.prepare`` or
      :func:`jaxdiff.data.shard_writer.write_arrays` at ``path``
      (:class:`jaxdiff.data.shards.ArrayRecordSource`); ``image_size``, if given, must
      match the size the images were prepared at.
    * ``"latents"``: VAE latents at ``path`` encoded by ``python -m
      jaxdiff.pretrained.encode`` (:class:`jaxdiff.data.latents.LatentSource`): the scaled
      posterior mean, or with ``latents="sample"`` a posterior sample per draw (apply the
      source's ``.augmentation`` in :func:`.pipeline.make_iterator`).
    * Known TFDS names (``"cifar10"``, ``"mnist"``, ``"imagenet_resized/32x32"``, ...) and
      ``"tfds:<any tfds name>"``: read from ``data_dir`` via :func:`load_tfds`.

    Args:
        name: Dataset name; see :func:`dataset_names`.
        split: Split name (any TFDS split string for TFDS datasets).
        data_dir: Prepared TFDS data folder (TFDS datasets only).
        path: Local or cloud location of file-based datasets (image folders, prepared
            shards, ``.npy`` arrays).
        image_size: Side of the square images an image folder is cropped to.
        skip_corrupt: Image folders: skip unreadable images (counted and reported)
            instead of raising.
        latents: ``"latents"`` only: ``"sample"`` or ``"mean"`` (``config.data.latents``).
        latent_flip: ``"latents"`` only: use the stored mirrored-image moments (``None``:
            when stored).
        latent_scale: ``"latents"`` only: override the VAE scale of the metadata.
        latent_shift: ``"latents"`` only: override the VAE shift of the metadata.

    Returns:
        A source for :func:`.pipeline.make_iterator`; ``source.info`` holds ``image_shape``,
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
    if canonical == "npy":
        if not path:
            raise InvalidArgumentError(
                "dataset 'npy' needs a path: pass --config.data.path=DIR (a folder with "
                "images.npy and optional labels.npy) or a single .npy file"
            )
        return NpySource(path, name="npy", split=split)
    if canonical == "imagefolder":
        from jaxdiff.data.imagefolder import ImageFolderSource

        if not path:
            raise InvalidArgumentError(
                "dataset 'imagefolder' needs a path: pass --config.data.path=DIR (a folder "
                "of <class>/<image> subfolders, or of images)"
            )
        if image_size is None:
            raise InvalidArgumentError(
                "dataset 'imagefolder' needs an image size: pass --config.data.image_size=S "
                "(images are center-cropped to S x S)"
            )
        return ImageFolderSource(
            path, image_size=image_size, skip_corrupt=skip_corrupt, name=name, split=split
        )
    if canonical == "arrayrecord":
        from jaxdiff.data.shards import ArrayRecordSource

        if not path:
            raise InvalidArgumentError(
                "dataset 'arrayrecord' needs a path: pass --config.data.path=DIR (a folder "
                "written by python -m jaxdiff.data.prepare, holding dataset.json)"
            )
        source = ArrayRecordSource(path, name=name, split=split)
        if "latents" in source.metadata:  # raw moments: training on them skips the scaling
            raise InvalidArgumentError(
                f"{path} holds VAE latents (written by python -m jaxdiff.pretrained.encode): "
                "read it with --config.data.name=latents, which scales them"
            )
        prepared_size = source.metadata.get("image_size")
        if image_size is not None and prepared_size not in (None, image_size):
            raise InvalidArgumentError(
                f"{path} was prepared at image_size={prepared_size}, but "
                f"--config.data.image_size={image_size}; pass {prepared_size} or prepare "
                f"the images again with --image_size={image_size}"
            )
        return source
    if canonical == "latents":
        from jaxdiff.data.latents import LatentSource

        if not path:
            raise InvalidArgumentError(
                "dataset 'latents' needs a path: pass --config.data.path=DIR (a folder "
                "written by python -m jaxdiff.pretrained.encode)"
            )
        source = LatentSource(
            path,
            mode=latents,
            flip=latent_flip,
            scale=latent_scale,
            shift=latent_shift,
            name=name,
            split=split,
        )
        encoded_size = source.metadata.get("image_size")
        if image_size is not None and encoded_size not in (None, image_size):
            raise InvalidArgumentError(
                f"{path} holds latents of {encoded_size}px images, but "
                f"--config.data.image_size={image_size}; pass {encoded_size} or leave it unset"
            )
        return source
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
