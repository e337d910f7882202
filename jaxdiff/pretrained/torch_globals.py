"""The allow-list of a torch-free unpickler: what a PyTorch pickle may build, as inert data.

:mod:`jaxdiff.pretrained.torch_pickle` resolves every global a pickle names through
:data:`GLOBALS` (plus the storage classes and dtypes of :data:`STORAGES` / :data:`DTYPES`);
anything else is refused. Each entry is a stand-in defined here: tensors are lazy
:class:`Tensor` views of :class:`Storage` records, module objects are :class:`Stub`
records of their pickled ``__dict__``, and numpy scalars/arrays are rebuilt from their
bytes. Nothing here imports torch or executes code carried by the file.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import pickle
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from jaxdiff.pretrained.weights_io import WeightsError

BF16 = np.dtype(ml_dtypes.bfloat16)
STORAGES = {  # torch.<Name>Storage -> element dtype (little-endian on disk)
    "Float": "<f4", "Half": "<f2", "BFloat16": BF16, "Double": "<f8", "Long": "<i8",
    "Int": "<i4", "Short": "<i2", "Char": "i1", "Byte": "u1", "Bool": "?", "Untyped": "u1",
    "ComplexFloat": "<c8", "ComplexDouble": "<c16",
}  # fmt: skip
DTYPES = {  # torch.<name> dtype objects (the argument of _rebuild_tensor_v3)
    "float32": "<f4", "float": "<f4", "float16": "<f2", "half": "<f2", "bfloat16": BF16,
    "float64": "<f8", "double": "<f8", "int64": "<i8", "long": "<i8", "int32": "<i4",
    "int": "<i4", "int16": "<i2", "short": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
    "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "complex64": "<c8",
    "complex128": "<c16", "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}  # fmt: skip
STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")  # UntypedStorage: torch.storage
ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 pickles' names


class Stub:
    """Inert stand-in for an object of a module class: keeps its pickled ``__dict__``."""

    qualname, persistent, state = "?", False, types.MappingProxyType({})

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = dict(state) if isinstance(state, Mapping) else {}


@functools.cache
def stub_class(qualname: str) -> type:
    """The (cached) :class:`Stub` subclass standing in for module class ``qualname``."""
    return type(qualname.rsplit(".", 1)[-1], (Stub,), {"qualname": qualname})


class Marker(NamedTuple):
    """Stand-in for a class only passed as an argument (``torch.Tensor``, dtypes...)."""

    name: str
    dtype: np.dtype | None = None


class Storage:
    """A lazily read torch storage of ``numel`` elements of ``dtype``."""

    def __init__(self, dtype: np.dtype, numel: int, what: str):
        self.dtype, self.numel, self.what = dtype, int(numel), what
        self.load: Callable[[], bytes] | None = None
        self.swap, self.array = False, None

    def read(self) -> np.ndarray:
        """The storage's elements (read once, then cached)."""
        if self.array is None:
            if self.load is None:
                raise WeightsError(f"storage {self.what} has no data record")
            raw, want = self.load(), self.numel * self.dtype.itemsize
            if len(raw) != want:
                raise WeightsError(
                    f"storage {self.what} holds {len(raw)} bytes, expected {want} (the file "
                    "is truncated or damaged; download it again)"
                )
            if self.swap and self.dtype.itemsize > 1:  # big-endian file: reverse each scalar
                unit = self.dtype.itemsize // (2 if self.dtype.kind == "c" else 1)
                raw = np.frombuffer(raw, np.uint8).reshape(-1, unit)[:, ::-1].tobytes()
            self.array = np.frombuffer(raw, self.dtype)
        return self.array


@dataclasses.dataclass
class Tensor:
    """A lazy tensor: a strided view into a :class:`Storage` (offset and strides in elements)."""

    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype

    def numpy(self, key: str) -> np.ndarray:
        """A contiguous copy of the tensor (``key`` names it in errors)."""
        arr = self.storage.read()
        if arr.dtype != self.dtype:  # _rebuild_tensor_v3: a byte storage read as dtype
            if arr.nbytes % self.dtype.itemsize:
                raise WeightsError(f"tensor {key!r} does not fit its byte storage")
            arr = arr.view(self.dtype)
        if 0 in self.size:
            return np.zeros(self.size, self.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= arr.size:
            raise WeightsError(
                f"tensor {key!r} (shape {self.size}, strides {self.stride}, offset "
                f"{self.offset}) reaches past its storage of {arr.size} elements"
            )
        strides = [s * arr.itemsize for s in self.stride]
        view = np.lib.stride_tricks.as_strided(arr[self.offset :], self.size, strides)
        return np.array(view, order="C", copy=True)


def is_dtype(x: Any) -> bool:
    """Whether ``x`` is one of this module's torch dtype / storage class stand-ins."""
    return isinstance(x, Marker) and x.dtype is not None


def _rebuild(storage: Any, offset: int, size: tuple, stride: tuple, *_: Any) -> Tensor:
    """``torch._utils._rebuild_tensor`` / ``_v2`` (requires_grad, hooks, metadata unused)."""
    if not isinstance(storage, Storage):
        raise WeightsError(f"malformed tensor record: storage {storage!r}")
    sizes, strides = tuple(map(int, size)), tuple(map(int, stride))
    return Tensor(storage, int(offset), sizes, strides, storage.dtype)


def _rebuild_v3(storage, offset, size, stride, grad, hooks, dtype, *_: Any) -> Tensor:
    """``torch._utils._rebuild_tensor_v3``: the dtype comes apart from the (byte) storage."""
    if not is_dtype(dtype):
        raise WeightsError(f"malformed tensor record: dtype {dtype!r}")
    return dataclasses.replace(_rebuild(storage, offset, size, stride), dtype=dtype.dtype)


def _persistent_obj(meta: Any) -> Stub:
    """``torch_utils.persistence._reconstruct_persistent_obj``, minus running its source."""
    if not isinstance(meta, Mapping) or meta.get("type") != "class":
        raise WeightsError(f"unsupported persistent object record {type(meta).__name__}")
    obj = stub_class(str(meta.get("class_name")))()
    obj.__setstate__(meta.get("state") or {})
    obj.persistent = True
    return obj


def as_bytes(data: Any) -> bytes:
    """The bytes of a pickled bytes-like record (refusing anything else)."""
    if not isinstance(data, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
        raise WeightsError(f"expected bytes in a numpy record, got {type(data).__name__}")
    return bytes(data)


def _np_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    if not isinstance(spec, (str, bytes)):
        raise WeightsError(f"refusing numpy dtype spec {spec!r}")
    return np.dtype(spec.decode() if isinstance(spec, bytes) else spec, align, copy)


def _np_scalar(dtype: np.dtype, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype):
        raise WeightsError(f"refusing numpy scalar of {dtype!r}")
    if dtype.hasobject:  # the value is an already unpickled object
        return data
    return np.frombuffer(as_bytes(data), dtype, count=1)[0]


def _np_reconstruct(subtype: Marker, shape: Any, dtype: Any) -> np.ndarray:
    if subtype != Marker("numpy.ndarray"):
        raise WeightsError(f"refusing numpy array subclass {subtype!r}")
    # numpy pickles (0,) here and BUILD sets the real shape from the data, which numpy
    # checks; ignoring ``shape`` keeps a forged one from allocating memory.
    return np.ndarray.__new__(np.ndarray, (0,), dtype)


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    arr = np.frombuffer(as_bytes(buf), dtype if isinstance(dtype, np.dtype) else _np_dtype(dtype))
    return arr.reshape(shape, order=order).copy()


GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    # How protocol-2 pickles spell bytes objects.
    ("_codecs", "encode"): lambda text, encoding="latin1": str(text).encode("latin1"),
    ("torch._utils", "_rebuild_tensor"): _rebuild,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_: data,
    # A tensor subclass (with Python state) is read as its plain tensor.
    ("torch._tensor", "_rebuild_from_type_v2"): lambda func, cls, args, *_: func(*args),
    ("torch", "Tensor"): Marker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): Marker("torch.nn.Parameter"),
    ("torch", "Size"): tuple,
    ("torch", "device"): lambda *args: ":".join(map(str, args)),
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_obj,
    ("dnnlib.util", "EasyDict"): dict,
    ("dnnlib", "EasyDict"): dict,
    ("argparse", "Namespace"): stub_class("argparse.Namespace"),  # DiT/SiT "args" entry
    ("numpy", "dtype"): _np_dtype,
    ("numpy", "ndarray"): Marker("numpy.ndarray"),  # only as _reconstruct's argument
    **{(f"numpy.{m}.multiarray", "scalar"): _np_scalar for m in ("core", "_core")},
    **{(f"numpy.{m}.multiarray", "_reconstruct"): _np_reconstruct for m in ("core", "_core")},
    **{(f"numpy.{m}.numeric", "_frombuffer"): _np_frombuffer for m in ("core", "_core")},
}
