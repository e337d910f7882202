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
URLs but writes local files only, so :class:`.shard_writer.ShardWriter` writes a local
temporary file and uploads it through :mod:`jaxdiff.utils.storage`.

:mod:`jaxdiff.data.shard_writer` writes them. Example::

    write_arrays("data/latents", latents, labels, num_shards=4)   # float32 [N, 32, 32, 4]
    ArrayRecordSource("data/latents").get_batch(np.arange(8))["image"].shape  # (8, 32, 32, 4)
"""

from __future__ import annotations

import dataclasses
import json
import threading
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


def is_real_numeric(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is an integer or real floating type (bfloat16 included)."""
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
    "is_real_numeric",
    "ShardError",
    "read_metadata",
    "shard_bounds",
    "shard_name",
]
