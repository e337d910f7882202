"""Torch-free weight files: safetensors read/write with a checksum, and key-tracked dicts.

jaxdiff never imports torch. Converted weights live in `safetensors` files, a format
simple enough to read and write here directly: an 8-byte little-endian header length, a
JSON header mapping each tensor name to ``{"dtype", "shape", "data_offsets"}`` (plus an
optional ``"__metadata__"`` of strings), then the raw little-endian bytes. Files written by
:func:`write_weights` carry the SHA-256 of their data section in the metadata key
``"jaxdiff.sha256"``; :func:`read_weights` checks it, so a truncated or altered file is
named instead of loaded.

:class:`StateDict` wraps a flat ``{name: array}`` (PyTorch state-dict names) for the
architecture converters: every tensor is taken through :meth:`StateDict.take`, and
:meth:`StateDict.finish` reports keys that were never used, so a checkpoint of the wrong
architecture fails with the offending key rather than loading half its weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.utils import storage

CHECKSUM_KEY = "jaxdiff.sha256"
"""Metadata key holding the SHA-256 (hex) of a written file's data section."""

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit; a bigger "header" means a foreign file
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2, zip (torch.save)


class WeightsError(InvalidArgumentError):
    """A weight file that cannot be used: wrong format, key, shape or checksum."""


def _foreign_format(path: str, head: bytes) -> str | None:
    if head.startswith(_PICKLE_MAGIC):
        return (
            f"{path} is a PyTorch pickle/zip checkpoint, which jaxdiff does not load directly; "
            "convert it once with `python -m jaxdiff.pretrained.convert --src "
            f"{path} --dst OUT.safetensors` (no torch needed)"
        )
    return None


def read_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a ``.safetensors`` (or ``.npz``) weight file.

    Args:
      path: Local path or bucket URL.

    Returns:
      ``(tensors, metadata)``: numpy arrays by name (bfloat16 as ``ml_dtypes.bfloat16``)
      and the string metadata (empty for ``.npz``).

    Raises:
      WeightsError: If the file is missing, is a PyTorch pickle (convert it first), is not a
        valid safetensors file, or fails its checksum.
    """
    path = str(path)
    try:
        blob = storage.read_bytes(path)
    except FileNotFoundError:
        raise WeightsError(
            f"weight file {path} not found; pass a local path or gs:// URL"
        ) from None
    if path.endswith(".npz"):
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}, {}
        except Exception as e:
            raise WeightsError(f"{path}: not a readable .npz file ({e})") from None
    foreign = _foreign_format(path, blob[:4])
    if foreign:
        raise WeightsError(foreign)
    if len(blob) < 8:
        raise WeightsError(f"{path}: too short to be a safetensors file ({len(blob)} bytes)")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > _MAX_HEADER or 8 + size > len(blob):
        raise WeightsError(f"{path}: not a safetensors file (header length {size} is impossible)")
    try:
        header = json.loads(blob[8 : 8 + size])
    except ValueError as e:
        raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    data = memoryview(blob)[8 + size :]
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    want = metadata.get(CHECKSUM_KEY)
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise WeightsError(
            f"{path}: checksum mismatch (the file is truncated or was altered after "
            "conversion); convert the original checkpoint again"
        )
    tensors = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            start, stop = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: tensor {name!r} has a malformed header entry") from None
        count = int(np.prod(shape, dtype=np.int64))
        if stop - start != count * dtype.itemsize or stop > len(data):
            raise WeightsError(f"{path}: tensor {name!r} data does not match its shape {shape}")
        # A read-only view of the file's bytes (no second copy of a multi-GB file).
        tensors[name] = np.frombuffer(data[start:stop], dtype=dtype).reshape(shape)
    return tensors, metadata


def write_weights(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Writes tensors to a safetensors file (atomically), with a SHA-256 of the data.

    Args:
      path: Destination, local or a bucket URL.
      tensors: Arrays by name (any dtype in the safetensors set, bfloat16 included).
      metadata: Extra string metadata (e.g. a JSON config).

    Returns:
      The hex SHA-256 of the data section (also stored under :data:`CHECKSUM_KEY`).

    Raises:
      WeightsError: For a dtype safetensors cannot store.
    """
    header: dict[str, object] = {}
    arrays, offset, digest = [], 0, hashlib.sha256()
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
            arr = arr.copy(order="C")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        key = _NAMES.get(arr.dtype)
        if key is None:
            raise WeightsError(f"tensor {name!r} has dtype {arr.dtype}, which safetensors lacks")
        header[name] = {
            "dtype": key,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        # The tensors are hashed and written straight from their buffers: no copy of the
        # whole file is ever made (a converted DiT-XL is 2.7 GB).
        raw = arr.reshape(-1).view(np.uint8)  # bytes of any dtype, bfloat16 included
        digest.update(raw)
        arrays.append(raw)
        offset += arr.nbytes
    header["__metadata__"] = {
        **{str(k): str(v) for k, v in (metadata or {}).items()},
        CHECKSUM_KEY: digest.hexdigest(),
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section, as safetensors does
    storage.write_chunks(str(path), [struct.pack("<Q", len(head)) + head, *arrays])
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a whole file (to pin a published checkpoint)."""
    return hashlib.sha256(storage.read_bytes(str(path))).hexdigest()


class StateDict:
    """A flat ``{torch_key: array}`` whose every key must be taken exactly once.

    Example:
      >>> sd = StateDict({"w": np.ones((2, 3))}, source="net.pt")
      >>> sd.take("w", (2, 3)).shape
      (2, 3)
      >>> sd.finish()  # every key used
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "<memory>"):
        self._tensors = dict(tensors)
        self._used: set[str] = set()
        self.source = source

    def has(self, key: str) -> bool:
        """Whether ``key`` is present."""
        return key in self._tensors

    def keys(self) -> list[str]:
        """All keys, sorted."""
        return sorted(self._tensors)

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Returns the tensor under ``key`` (floats as float32) and marks it used.

        Args:
          key: The PyTorch state-dict name.
          shape: Expected shape, checked when given.

        Raises:
          WeightsError: If the key is missing or has another shape.
        """
        if key not in self._tensors:
            close = [k for k in self._tensors if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0]]
            hint = f"; keys nearby: {close[:4]}" if close else ""
            raise WeightsError(
                f"{self.source}: missing key {key!r}{hint}. Is this the right architecture "
                "and size for the file?"
            )
        arr = np.asarray(self._tensors[key])
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise WeightsError(
                f"{self.source}: key {key!r} has shape {tuple(arr.shape)}, expected "
                f"{tuple(shape)} for this config"
            )
        self._used.add(key)
        if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            return arr
        return arr.astype(np.float32, copy=False)  # no copy of what is float32 already

    def finish(self) -> None:
        """Raises if some keys were never taken.

        Raises:
          WeightsError: Naming the unused keys (the first few of them).
        """
        left = sorted(set(self._tensors) - self._used)
        if left:
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            raise WeightsError(
                f"{self.source}: unexpected keys {left[:5]}{more}; the file holds weights this "
                "architecture/config does not have"
            )


__all__ = [
    "CHECKSUM_KEY",
    "StateDict",
    "WeightsError",
    "file_sha256",
    "read_weights",
    "write_weights",
]
