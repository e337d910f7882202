"""TFDS datasets read without TensorFlow, through ``tfds.data_source`` (ArrayRecord).

``tfds.data_source`` gives random access to datasets prepared with
``file_format="array_record"``; reading needs no TensorFlow, but *preparing* does, and
jaxdiff never downloads (``download=False``). A dataset that is not prepared raises
:class:`DatasetNotPreparedError`, whose message says where it looked and how to prepare
the data on a machine with TensorFlow and network access.

uint8 images become float32 HWC in [-1, 1] (``x / 127.5 - 1``); any other numeric image
feature (e.g. float latents extracted by a VAE) is returned as float32 exactly as stored,
since such arrays carry their own scale. Labels become int32. Batches are read with one
``__getitems__`` call when the data source has it (TFDS ArrayRecord sources do), so the
per-record work happens inside ArrayRecord instead of a Python loop here.
``tensorflow_datasets`` is imported lazily, so ``import jaxdiff.data`` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from jaxdiff.data.sources import Batch, DatasetInfo


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How to read one TFDS dataset.

    Attributes:
        image_key: Feature holding the image: uint8 (mapped to [-1, 1]) or any other
            numeric dtype (returned as float32 as stored).
        label_key: Feature holding the integer class label, or ``None`` if unlabelled.
        num_classes: Number of classes; ``None`` means "read it from the dataset info".
        image_shape: ``(H, W, C)``; ``None`` means "read it from the data".
    """

    image_key: str = "image"
    label_key: str | None = "label"
    num_classes: int | None = None
    image_shape: tuple[int, int, int] | None = None


def _labelled(classes: int, shape: tuple[int, int, int]) -> TfdsSpec:
    return TfdsSpec("image", "label", classes, shape)


#: TFDS names jaxdiff knows; any other name works with an explicit (or default) spec.
KNOWN_TFDS: dict[str, TfdsSpec] = {
    "mnist": _labelled(10, (28, 28, 1)),
    "fashion_mnist": _labelled(10, (28, 28, 1)),
    "cifar10": _labelled(10, (32, 32, 3)),
    "cifar100": _labelled(100, (32, 32, 3)),
    "svhn_cropped": _labelled(10, (32, 32, 3)),
    "imagenet_resized/8x8": _labelled(1000, (8, 8, 3)),
    "imagenet_resized/16x16": _labelled(1000, (16, 16, 3)),
    "imagenet_resized/32x32": _labelled(1000, (32, 32, 3)),
    "imagenet_resized/64x64": _labelled(1000, (64, 64, 3)),
    # The "downsampled ImageNet" of the PixelCNN/VDM papers: no labels.
    "downsampled_imagenet/32x32": TfdsSpec("image", None, None, (32, 32, 3)),
    "downsampled_imagenet/64x64": TfdsSpec("image", None, None, (64, 64, 3)),
}

#: Short names accepted for convenience.
TFDS_ALIASES: dict[str, str] = {
    "imagenet32": "imagenet_resized/32x32",
    "imagenet64": "imagenet_resized/64x64",
}


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is not available as ArrayRecord in the searched ``data_dir``."""


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> str | None:
    # tfds reads TFDS_DATA_DIR once, at import time; reading it here as well makes the
    # variable work even when it is set after tensorflow_datasets was imported.
    if data_dir is not None:
        return os.fspath(data_dir)
    return os.environ.get("TFDS_DATA_DIR") or None


def _not_prepared_message(name: str, split: str, data_dir: str | None, err: Exception) -> str:
    import tensorflow_datasets as tfds

    root = data_dir or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    try:  # the exact versioned folder tfds looked in, when tfds can tell us
        looked_in = tfds.builder(name, data_dir=data_dir).data_dir
    except Exception:  # best effort: the message is still useful without the folder
        looked_in = os.path.join(root, name)
    return (
        f"TFDS dataset {name!r} (split {split!r}) is not prepared as ArrayRecord under "
        f"data_dir={root!r} (looked in {looked_in}). jaxdiff reads TFDS data without "
        "TensorFlow and never downloads, so prepare it once on a machine with TensorFlow "
        "and network access:\n"
        "    pip install tensorflow tensorflow-datasets\n"
        f"    tfds build {name} --file_format=array_record --data_dir={root}\n"
        "  or, in Python:\n"
        f"    tfds.builder({name!r}, data_dir={root!r}, "
        "file_format='array_record').download_and_prepare()\n"
        f"then copy {root} here if needed and pass data_dir={root!r} (or set TFDS_DATA_DIR)."
        f"\n(tensorflow_datasets said: {type(err).__name__}: {err})"
    )


def _open_data_source(name: str, split: str, data_dir: str | None) -> Any:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.registered import DatasetNotFoundError

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except DatasetNotFoundError as err:
        known = sorted([*KNOWN_TFDS, *TFDS_ALIASES])
        raise ValueError(
            f"TFDS has no dataset named {name!r} (check the spelling, or a config suffix "
            f"such as 'name/config'). Names jaxdiff knows: {known}; any name from "
            "tfds.list_builders() also works."
        ) from err
    except (NotImplementedError, FileNotFoundError, AssertionError, OSError) as err:
        # Missing data surfaces as NotImplementedError ("FileFormat.TFRECORD is not
        # supported") with download=False; other tfds versions raise the others.
        raise DatasetNotPreparedError(_not_prepared_message(name, split, data_dir, err)) from err


def _to_float32(image: np.ndarray) -> np.ndarray:
    # uint8 means pixels: map them to the [-1, 1] every image model expects. Any other
    # dtype (float latents, int16 scans, ...) is data with its own scale: keep it as is.
    if image.dtype == np.uint8:
        return image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    return image.astype(np.float32)


class TfdsSource:
    """Random-access source over a TFDS ArrayRecord dataset, normalised for diffusion.

    Use :func:`load_tfds` to build one. Examples are ``{"image": float32 [H, W, C],
    "label": int32 []}`` (no ``"label"`` for unlabelled datasets); uint8 images are mapped
    to [-1, 1], other numeric image features (float latents) are kept as stored.

    Attributes:
        info: Dataset metadata.
        spec: The :class:`TfdsSpec` used to read the data.
    """

    def __init__(self, data_source: Any, *, name: str, split: str, spec: TfdsSpec) -> None:
        self._source = data_source
        self.spec = spec
        n = len(data_source)
        shape, num_classes = spec.image_shape, spec.num_classes
        if n:
            first = data_source[0]
            for key in (spec.image_key, spec.label_key):
                if key is not None and key not in first:
                    raise ValueError(
                        f"TFDS dataset {name!r} has no feature {key!r}; its features are "
                        f"{sorted(first)}. Pass load_tfds(..., spec=TfdsSpec(image_key=..., "
                        "label_key=...)) naming the right ones (label_key=None if unlabelled)."
                    )
            image = np.asarray(first[spec.image_key])
            if image.dtype.kind not in "biuf":
                raise ValueError(
                    f"TFDS dataset {name!r}: feature {spec.image_key!r} has dtype "
                    f"{image.dtype}; the image feature must be numeric (uint8 pixels, or "
                    "float arrays such as latents): pass TfdsSpec(image_key=...) naming "
                    "a decoded image or tensor feature"
                )
            shape = shape or self._hwc(image).shape
        if num_classes is None and spec.label_key is not None:
            num_classes = self._num_classes_from_info(data_source, spec.label_key)
        self.info = DatasetInfo(
            name=name,
            split=split,
            image_shape=tuple(shape or ()),
            num_classes=num_classes,
            num_examples=n,
        )

    @staticmethod
    def _hwc(image: np.ndarray) -> np.ndarray:
        return image[..., None] if image.ndim == 2 else image

    @staticmethod
    def _num_classes_from_info(data_source: Any, label_key: str) -> int | None:
        try:
            return int(data_source.dataset_info.features[label_key].num_classes)
        except (AttributeError, KeyError, TypeError):
            return None

    def __len__(self) -> int:
        """Number of examples in the split."""
        return len(self._source)

    def _raw(self, record: Any) -> tuple[np.ndarray, Any]:
        image = self._hwc(np.asarray(record[self.spec.image_key]))
        label = None if self.spec.label_key is None else record[self.spec.label_key]
        return image, label

    def _read(self, indices: np.ndarray) -> list[Any]:
        keys = [int(i) for i in np.asarray(indices).reshape(-1)]
        getitems = getattr(self._source, "__getitems__", None)
        if getitems is None:  # e.g. a plain Python sequence: one record at a time
            return [self._source[k] for k in keys]
        # One call for the whole batch: ArrayRecord groups the keys by file and reads them
        # in parallel, far faster than a Python loop of single reads.
        records = list(getitems(keys))
        if len(records) != len(keys):
            raise IndexError(
                f"TFDS dataset {self.info.name!r}: asked for {len(keys)} records, the data "
                f"source returned {len(records)}"
            )
        return records

    def __getitem__(self, index: int) -> Batch:
        """Returns example ``index`` (uint8 images in [-1, 1], others as stored)."""
        image, label = self._raw(self._source[int(index)])
        example = {"image": _to_float32(image)}
        if label is not None:
            example["label"] = np.asarray(label, dtype=np.int32)
        return example

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Reads the examples at ``indices`` in one call and converts them as one array."""
        raws = [self._raw(record) for record in self._read(indices)]
        try:
            images = np.stack([image for image, _ in raws])
        except ValueError as err:
            shapes = sorted({image.shape for image, _ in raws})
            raise ValueError(
                f"TFDS dataset {self.info.name!r} has images of different shapes {shapes}; "
                "only fixed-size images can be batched (use a resized variant)"
            ) from err
        batch = {"image": _to_float32(images)}
        if self.spec.label_key is not None:
            batch["label"] = np.asarray([label for _, label in raws], dtype=np.int32)
        return batch

    def __repr__(self) -> str:
        return f"TfdsSource({self.info})"


def load_tfds(
    name: str,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    spec: TfdsSpec | None = None,
) -> TfdsSource:
    """Opens a prepared TFDS dataset as a random-access source (no TensorFlow needed).

    Args:
        name: TFDS name, e.g. ``"cifar10"``, ``"mnist"``, ``"imagenet_resized/32x32"``,
            or an alias from :data:`TFDS_ALIASES` (``"imagenet32"``).
        split: Any TFDS split string, e.g. ``"train"``, ``"test"``, ``"train[:90%]"``.
        data_dir: Folder holding prepared TFDS data; defaults to ``$TFDS_DATA_DIR``, then
            ``~/tensorflow_datasets``.
        spec: Feature keys and metadata. Defaults to the :data:`KNOWN_TFDS` entry, or for
            other names ``TfdsSpec()`` (``"image"``/``"label"``, metadata read from the
            data; the label is dropped if the dataset has no ``"label"`` feature).

    Returns:
        A :class:`TfdsSource`.

    Raises:
        DatasetNotPreparedError: If the dataset is not prepared as ArrayRecord in
            ``data_dir``; the message explains how to prepare it.
        ValueError: If TFDS does not know ``name`` or the feature keys are wrong.
    """
    name = TFDS_ALIASES.get(name, name)
    data_dir = _resolve_data_dir(data_dir)
    source = _open_data_source(name, split, data_dir)
    if spec is None:
        spec = KNOWN_TFDS.get(name)
    if spec is None:
        spec = TfdsSpec()
        if len(source) and spec.label_key not in source[0]:
            spec = dataclasses.replace(spec, label_key=None)
    return TfdsSource(source, name=name, split=split, spec=spec)
