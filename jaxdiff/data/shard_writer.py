"""Writing prepared datasets: shard files and ``dataset.json`` (format: :mod:`.shards`).

Example::

    write_arrays("data/latents", latents, labels, num_shards=4)   # float32 [N, 32, 32, 4]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxdiff.data.shards import (
    ENCODINGS,
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    WRITER_OPTIONS,
    Feature,
    is_real_numeric,
    shard_bounds,
    shard_name,
)
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.utils import storage


def _record_bytes(features: Sequence[Feature], values: Mapping[str, Any], row: int) -> bytes:
    return b"".join(
        np.ascontiguousarray(values[f.name][row], dtype=f.np_dtype).tobytes() for f in features
    )


class ShardWriter:
    """Writes one shard file; nothing appears at ``path`` until :meth:`close` succeeds.

    Records go to a temporary file (next to ``path``, or in the system temp folder for a
    cloud ``path``) that ``close()`` renames into place or uploads. As a context manager,
    an exception discards the temporary file instead.

    Args:
        path: Destination shard file (local or ``gs://``).
        features: Record layout; see :class:`Feature`.
        options: ArrayRecord writer options.
    """

    def __init__(
        self, path: storage.PathLike, features: Sequence[Feature], *, options: str = WRITER_OPTIONS
    ) -> None:
        from array_record.python import array_record_module

        self.path = storage.to_str(path)
        self.features = tuple(features)
        self.num_written = 0
        name = os.path.basename(self.path)
        if storage.is_remote(self.path):
            fd, self._tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
        else:
            storage.makedirs(os.path.dirname(self.path))
            self._tmp = os.path.join(
                os.path.dirname(self.path), f".{name}.tmp-{uuid.uuid4().hex[:8]}"
            )
        self._writer = array_record_module.ArrayRecordWriter(self._tmp, options)
        if not self._writer.ok():
            raise OSError(f"cannot create shard file {self._tmp} (for {self.path})")

    def write(self, **values: Any) -> None:
        """Appends one example; ``values`` maps every feature name to its array."""
        self.write_batch(**{k: np.asarray(v)[None] for k, v in values.items()})

    def write_batch(self, **arrays: Any) -> None:
        """Appends ``len(arrays[name])`` examples, one record each."""
        missing = {f.name for f in self.features} - set(arrays)
        if missing:
            raise InvalidArgumentError(f"write to {self.path} lacks features {sorted(missing)}")
        arrays = {f.name: np.asarray(arrays[f.name]) for f in self.features}
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise InvalidArgumentError(f"feature arrays have different lengths {lengths}")
        for f in self.features:
            if arrays[f.name].shape[1:] != f.shape:
                raise InvalidArgumentError(
                    f"feature {f.name!r} must have shape [N, {', '.join(map(str, f.shape))}] "
                    f"for {self.path}; got {arrays[f.name].shape}"
                )
        for row in range(lengths.pop()):
            self._writer.write(_record_bytes(self.features, arrays, row))
            self.num_written += 1

    def close(self) -> int:
        """Finishes the file and publishes it at ``path``; returns the record count."""
        self._writer.close()
        try:
            if storage.is_remote(self.path):
                # One streamed upload: an object store publishes it whole or not at all.
                with open(self._tmp, "rb") as src, storage.open_file(self.path, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
            else:
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)
        return self.num_written

    def abort(self) -> None:
        """Discards the partial shard."""
        self._writer.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_metadata(
    path: storage.PathLike,
    *,
    features: Sequence[Feature],
    shards: Sequence[tuple[str, int]],
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    skipped: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Writes ``dataset.json`` atomically, which makes the folder a dataset.

    Args:
        path: Dataset folder.
        features: Record layout, in record order.
        shards: ``(file name, record count)`` per shard, in example order.
        classes: Label names (index = label); they set ``num_classes``.
        num_classes: Number of classes for labels without names.
        image_size: Side of square images, if the data are images.
        skipped: Source files left out (e.g. unreadable images).
        extra: More JSON-serialisable entries (e.g. where the data came from).

    Returns:
        The metadata file written.
    """
    if classes is not None:
        num_classes = len(classes)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "num_examples": int(sum(count for _, count in shards)),
        "shards": [{"file": name, "num_examples": int(count)} for name, count in shards],
        "features": {f.name: f.to_json() for f in features},
        "classes": None if classes is None else list(classes),
        "num_classes": num_classes,
        "image_size": image_size,
        "skipped": list(skipped),
        **(extra or {}),
    }
    return storage.write_text(storage.join(path, METADATA_FILE), json.dumps(meta, indent=1))


def write_arrays(
    path: storage.PathLike,
    image: np.ndarray,
    label: np.ndarray | None = None,
    *,
    num_shards: int = 1,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
    encoding: str = "raw",
    overwrite: bool = False,
) -> str:
    """Writes aligned arrays as a prepared dataset readable by :class:`.shards.ArrayRecordSource`.

    Args:
        path: Destination folder (local or ``gs://``).
        image: ``[N, ...]`` array of any shape and numeric dtype (float32, float16,
            bfloat16, uint8...). Stored as is.
        label: Optional ``[N]`` integer labels (stored as int32).
        num_shards: Number of shard files (contiguous, near-equal slices).
        classes: Optional label names.
        num_classes: Number of classes; inferred as ``label.max() + 1`` if not given.
        encoding: ``"raw"`` (read back as float32 values) or ``"uint8"`` (uint8 pixels,
            read back as float32 in [-1, 1]).
        overwrite: Replace an existing dataset at ``path``.

    Returns:
        The dataset folder, as a string.

    Raises:
        InvalidArgumentError: For mismatched shapes, a bad encoding, or an existing
            dataset without ``overwrite=True``.

    Example::

        write_arrays("/tmp/latents", np.zeros((10, 4, 4, 4), np.float32), np.arange(10))
    """
    image = np.asarray(image)
    if encoding not in ENCODINGS:
        raise InvalidArgumentError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if encoding == "uint8" and image.dtype != np.uint8:
        raise InvalidArgumentError(
            f"encoding='uint8' needs uint8 pixels, got dtype {image.dtype}; use "
            "encoding='raw' or convert with image.astype(np.uint8)"
        )
    if image.ndim < 1 or not is_real_numeric(image.dtype):
        raise InvalidArgumentError(
            f"image must be a real numeric [N, ...] array, got dtype {image.dtype} shape "
            f"{image.shape}"
        )
    features = [Feature("image", tuple(image.shape[1:]), image.dtype.name, encoding)]
    arrays = {"image": image}
    if label is not None:
        label = np.asarray(label)
        if label.shape != (len(image),) or not np.issubdtype(label.dtype, np.integer):
            raise InvalidArgumentError(
                f"label must be integers of shape ({len(image)},), got {label.dtype} {label.shape}"
            )
        if num_classes is None and classes is None and len(label):
            num_classes = int(label.max()) + 1
        features.append(Feature("label", (), "int32"))
        arrays["label"] = label.astype(np.int32)
    meta_file = storage.join(path, METADATA_FILE)
    if storage.exists(meta_file):
        if not overwrite:
            raise InvalidArgumentError(
                f"{storage.to_str(path)} already holds a dataset; pass overwrite=True or "
                "choose another path"
            )
        storage.remove(meta_file)  # first: a crash below must not leave a stale dataset
    shards = []
    for i, (start, stop) in enumerate(shard_bounds(len(image), num_shards)):
        name = shard_name(i, num_shards)
        with ShardWriter(storage.join(path, name), features) as writer:
            writer.write_batch(**{k: v[start:stop] for k, v in arrays.items()})
        shards.append((name, stop - start))
    write_metadata(path, features=features, shards=shards, classes=classes, num_classes=num_classes)
    return storage.to_str(path)


__all__ = ["ShardWriter", "write_arrays", "write_metadata"]
