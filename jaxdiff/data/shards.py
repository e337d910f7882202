"""Prepared datasets: fixed-size arrays in ArrayRecord shards, read in whole batches.

A prepared dataset is a folder of ``shard-00000-of-00008.array_record``... files
(group size 1: random access) and ``dataset.json``, written last and atomically, so a
folder without it is never mistaken for a dataset. The metadata holds the format
version, ``num_examples``, each shard's file and record count, the ``features`` (name ->
shape, dtype, encoding) in record order, ``classes`` or ``num_classes``, ``image_size``
and any ``skipped`` source files.

A record is the raw little-endian bytes of each feature, concatenated in feature order,
so a batch decodes with one ``np.frombuffer`` (no pickle). Image encodings: ``"uint8"``
pixels read back as float32 ``x / 127.5 - 1`` (exactly as image folders are), ``"raw"``
arrays of any numeric dtype (latents, features; bfloat16 via ml_dtypes) read back as
float32 values as stored.

array_record (>= 0.8, built with riegeli's GcsReader) reads local files and ``gs://``
URLs but writes local files only, so :class:`ShardWriter` writes a local temporary file
and uploads it through :mod:`jaxdiff.utils.storage`.

Example::

    write_arrays("data/latents", latents, labels, num_shards=4)   # float32 [N, 32, 32, 4]
    ArrayRecordSource("data/latents").get_batch(np.arange(8))["image"].shape  # (8, 32, 32, 4)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np

from jaxdiff.data.imagefolder import uint8_to_unit
from jaxdiff.data.sources import Batch, DatasetInfo
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.utils import storage

FORMAT = "jaxdiff.arrayrecord"
FORMAT_VERSION = 1
METADATA_FILE = "dataset.json"
#: Writer options: one record per chunk, so any record is read without its neighbours.
WRITER_OPTIONS = "group_size:1"
# Random access: no readahead (what array_record's own data source uses).
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
ENCODINGS = ("raw", "uint8")


class ShardError(InvalidArgumentError):
    """A prepared dataset that is incomplete or damaged; the message names the file."""


def _ml_dtype(name: str) -> Any:
    """The ml_dtypes scalar type called ``name`` (bfloat16, float8_*...), or ``None``."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return getattr(ml_dtypes, name, None)


def _np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:  # numpy resolves "bfloat16" by name only once ml_dtypes is imported
        if _ml_dtype(name) is None:
            raise ShardError(f"unknown dtype {name!r} in dataset metadata") from None
        return np.dtype(_ml_dtype(name))


def _is_real_numeric(dtype: np.dtype) -> bool:
    if np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating):
        return True
    # ml_dtypes' types are "void" to numpy; accept those by name only.
    return dtype.kind == "V" and dtype.fields is None and _ml_dtype(dtype.name) is not None


@dataclasses.dataclass(frozen=True)
class Feature:
    """One fixed-size array per record.

    Attributes:
        name: Key in the examples (``"image"``, ``"label"``).
        shape: Shape of one example's array (``()`` for a scalar).
        dtype: numpy dtype name as stored (``"uint8"``, ``"float32"``, ``"bfloat16"``).
        encoding: ``"uint8"`` (pixels, read as [-1, 1] floats) or ``"raw"``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str = "raw"

    @property
    def np_dtype(self) -> np.dtype:
        """The dtype as a (little-endian) numpy dtype."""
        return _np_dtype(self.dtype).newbyteorder("<")

    @property
    def nbytes(self) -> int:
        """Bytes of this feature in one record."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        """The metadata entry (without the name)."""
        return {"shape": list(self.shape), "dtype": self.dtype, "encoding": self.encoding}


def shard_name(index: int, num_shards: int) -> str:
    """File name of shard ``index`` of ``num_shards``."""
    return f"shard-{index:05d}-of-{num_shards:05d}.array_record"


def shard_bounds(num_examples: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` example ranges of near-equal size, one per shard."""
    if num_shards < 1 or num_shards > max(num_examples, 1):
        raise InvalidArgumentError(
            f"num_shards={num_shards} must be between 1 and the number of examples "
            f"({num_examples}); pass a smaller num_shards"
        )
    edges = [i * num_examples // num_shards for i in range(num_shards + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


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


def read_metadata(path: storage.PathLike) -> dict[str, Any]:
    """Reads and checks ``dataset.json`` of a prepared dataset.

    Raises:
        ShardError: If there is no ``dataset.json`` (not a dataset, or its preparation did
            not finish) or it is not one this version understands.
    """
    file = storage.join(path, METADATA_FILE)
    if not storage.exists(file):
        raise ShardError(
            f"{storage.to_str(path)} is not a prepared dataset: {METADATA_FILE} is missing "
            "(it is written last, so preparation may not have finished); run python -m "
            "jaxdiff.data.prepare --src IMAGES --dst DIR (rerunning resumes), or fix "
            "--config.data.path"
        )
    try:
        meta = json.loads(storage.read_text(file))
    except json.JSONDecodeError as err:
        raise ShardError(f"{file} is not valid JSON ({err}); prepare the dataset again") from err
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ShardError(
            f"{file} has format {meta.get('format')!r} version {meta.get('version')!r}; this "
            f"jaxdiff reads {FORMAT!r} version {FORMAT_VERSION}: prepare the dataset again"
        )
    return meta


def _features(meta: Mapping[str, Any]) -> tuple[Feature, ...]:
    return tuple(
        Feature(name, tuple(spec["shape"]), spec["dtype"], spec.get("encoding", "raw"))
        for name, spec in meta["features"].items()
    )


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
    """Writes aligned arrays as a prepared dataset readable by :class:`ArrayRecordSource`.

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
    if image.ndim < 1 or not _is_real_numeric(image.dtype):
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


class ArrayRecordSource:
    """Random-access source over a prepared dataset, decoding whole batches at once.

    Args:
        path: Dataset folder (local or ``gs://``) holding ``dataset.json``.
        name: Dataset name for :attr:`info`.
        split: Split name for :attr:`info`.
        validate: Open every shard now and check its record count (one small read per
            shard), so a missing or truncated file fails here rather than mid-training.

    Attributes:
        info: Shapes and counts from the metadata.
        metadata: The parsed ``dataset.json``.
        classes: Label names, or ``None``.
        features: Record layout.

    Raises:
        ShardError: If ``dataset.json`` or a shard is missing, truncated or disagrees with
            the metadata.

    Readers are opened lazily and dropped when pickled, so grain worker processes each
    open their own.
    """

    def __init__(
        self,
        path: storage.PathLike,
        *,
        name: str = "arrayrecord",
        split: str = "train",
        validate: bool = True,
    ) -> None:
        self.root = storage.to_str(path)
        if storage.is_remote(self.root) and not self.root.startswith("gs://"):
            raise ShardError(
                f"array_record reads local files and gs:// URLs only, not {self.root}; copy "
                "the dataset to local disk (or mount it, e.g. with gcsfuse) and pass that path"
            )
        self.metadata = read_metadata(self.root)
        self.features = _features(self.metadata)
        if "image" not in {f.name for f in self.features}:
            raise ShardError(f"{self.root}/{METADATA_FILE} has no 'image' feature")
        self._files = [storage.join(self.root, s["file"]) for s in self.metadata["shards"]]
        counts = [int(s["num_examples"]) for s in self.metadata["shards"]]
        self._ends = np.cumsum(counts, dtype=np.int64)
        self._record_size = sum(f.nbytes for f in self.features)
        self.classes = self.metadata.get("classes")
        image = next(f for f in self.features if f.name == "image")
        has_label = any(f.name == "label" for f in self.features)
        self.info = DatasetInfo(
            name=name,
            split=split,
            image_shape=image.shape,
            num_classes=self.metadata.get("num_classes") if has_label else None,
            num_examples=int(self.metadata["num_examples"]),
        )
        if int(self._ends[-1] if counts else 0) != self.info.num_examples:
            raise ShardError(
                f"{self.root}/{METADATA_FILE}: num_examples={self.info.num_examples} but its "
                f"shards hold {sum(counts)}; prepare the dataset again"
            )
        self._init_readers()
        if validate:
            self._validate(counts)

    def _init_readers(self) -> None:
        self._readers: list[Any] = [None] * len(self._files)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_readers"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_readers()

    def _open(self, shard: int) -> Any:
        reader = self._readers[shard]
        if reader is not None:
            return reader
        from array_record.python import array_record_module

        file = self._files[shard]
        if not storage.exists(file):
            raise ShardError(
                f"shard file {file} is missing; prepare the dataset again (rerunning python "
                "-m jaxdiff.data.prepare redoes only the missing shards)"
            )
        try:
            reader = array_record_module.ArrayRecordReader(
                file, _READER_OPTIONS, file_reader_buffer_size=32768
            )
        except RuntimeError as err:
            hint = ""
            if storage.is_remote(file):  # builds before 0.8 have no GCS reader
                hint = (
                    "; if this array_record cannot read gs:// (it needs array_record >= 0.8 "
                    "and Google Cloud credentials), copy the dataset to local disk or mount "
                    "the bucket (gcsfuse) and pass that path"
                )
            raise ShardError(f"cannot open shard file {file}: {err}{hint}") from err
        # A truncated or foreign file opens "successfully" and then reads empty records,
        # so the status must be checked here.
        if not reader.ok():
            raise ShardError(
                f"shard file {file} is truncated or not an ArrayRecord file; delete it and "
                "rerun python -m jaxdiff.data.prepare (it redoes that shard), or copy it again"
            )
        with self._lock:  # two threads may race to open a shard: keep one reader
            if self._readers[shard] is None:
                self._readers[shard] = reader
            else:
                reader.close()
            return self._readers[shard]

    def _validate(self, counts: Sequence[int]) -> None:
        def check(shard: int) -> None:
            found = self._open(shard).num_records()
            if found != counts[shard]:
                raise ShardError(
                    f"shard file {self._files[shard]} holds {found} records but "
                    f"{METADATA_FILE} says {counts[shard]}; prepare the dataset again"
                )

        self._map(check, range(len(self._files)))

    def _map(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        """``[fn(x) for x in items]``, overlapped on threads for cloud shards."""
        if not storage.is_remote(self.root) or len(items) < 2:
            return [fn(item) for item in items]
        # One network round trip per shard dominates; readers are thread-safe.
        with futures.ThreadPoolExecutor(min(16, len(items))) as pool:
            return list(pool.map(fn, items))

    def __len__(self) -> int:
        """Number of examples."""
        return self.info.num_examples

    def read_raw(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Reads the examples at ``indices`` as stored (dtype and all), one call per shard.

        Returns:
            ``{name: array [len(indices), *shape]}`` for every feature.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            bad = indices[(indices < 0) | (indices >= n)][0]
            raise IndexError(f"index {bad} out of range for {n} examples in {self.root}")
        shard_of = np.searchsorted(self._ends, indices, side="right")
        starts = np.concatenate([[0], self._ends[:-1]])
        groups = [(int(shard), np.flatnonzero(shard_of == shard)) for shard in np.unique(shard_of)]

        def read(group: tuple[int, np.ndarray]) -> list[bytes]:
            shard, where = group
            return self._open(shard).read((indices[where] - starts[shard]).tolist())

        records: list[bytes] = [b""] * len(indices)
        for (shard, where), found in zip(groups, self._map(read, groups), strict=True):
            for slot, record in zip(where, found, strict=True):
                if len(record) != self._record_size:
                    raise ShardError(
                        f"record {indices[slot] - starts[shard]} of shard file "
                        f"{self._files[shard]} has {len(record)} bytes, expected "
                        f"{self._record_size}; the file is damaged: prepare the dataset again"
                    )
                records[slot] = record
        table = np.frombuffer(b"".join(records), dtype=np.uint8).reshape(
            len(indices), self._record_size
        )
        out, offset = {}, 0
        for f in self.features:
            column = np.ascontiguousarray(table[:, offset : offset + f.nbytes])
            out[f.name] = column.view(f.np_dtype).reshape(len(indices), *f.shape)
            offset += f.nbytes
        return out

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Returns ``{"image": float32 [B, ...], "label": int32 [B]}`` for ``indices``."""
        raw = self.read_raw(indices)
        batch = {}
        for f in self.features:
            value = raw[f.name]
            if f.name == "label":
                batch[f.name] = value.astype(np.int32)
            elif f.encoding == "uint8":
                batch[f.name] = uint8_to_unit(value)
            else:
                batch[f.name] = value.astype(np.float32)
        return batch

    def __getitem__(self, index: int) -> Batch:
        """Returns example ``index`` (negative indices count from the end)."""
        index = int(index)
        if index < 0:
            index += len(self)
        return {k: v[0] for k, v in self.get_batch([index]).items()}

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.root!r}, {self.info})"


__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "ArrayRecordSource",
    "Feature",
    "ShardError",
    "ShardWriter",
    "read_metadata",
    "shard_bounds",
    "shard_name",
    "write_arrays",
    "write_metadata",
]
