"""Reads PyTorch weight files without torch, and without running code from them.

Published checkpoints come in three pickle-based layouts, all read here:

* ``torch.save`` zip archives (``<name>/data.pkl`` plus one ``<name>/data/<key>`` record
  per storage), e.g. DiT's ``DiT-XL-2-256x256.pt`` or SiT's checkpoints;
* the legacy ``torch.save`` stream (magic number, protocol, system info, pickle, storage
  keys, raw storages), also what torch embeds for each storage of a *plain* pickle;
* plain pickles of ``torch.nn.Module`` trees, e.g. EDM2's ``edm2-img512-*.pkl``, whose
  classes are ``torch_utils.persistence`` classes carrying their source code.

The pickle is read by a restricted unpickler: only an allow-list of globals resolves
(containers, torch's tensor-rebuild functions, storage classes and dtypes, module classes,
EDM2's persistence hook, a few numpy constructors), and each resolves to an inert
stand-in defined here. Module classes become :class:`_Stub` records of their ``__dict__``;
embedded source code is never executed. Tensors stay lazy references until the chosen
entry is flattened into state-dict names, so optimizer states are never read.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import os
import pickle
import struct
import types
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from jaxdiff.pretrained.weights_io import WeightsError
from jaxdiff.utils import storage as _files

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_BF16 = np.dtype(ml_dtypes.bfloat16)
_STORAGES = {  # torch.<Name>Storage -> element dtype (little-endian on disk)
    "Float": "<f4", "Half": "<f2", "BFloat16": _BF16, "Double": "<f8", "Long": "<i8",
    "Int": "<i4", "Short": "<i2", "Char": "i1", "Byte": "u1", "Bool": "?", "Untyped": "u1",
    "ComplexFloat": "<c8", "ComplexDouble": "<c16",
}  # fmt: skip
_DTYPES = {  # torch.<name> dtype objects (the argument of _rebuild_tensor_v3)
    "float32": "<f4", "float": "<f4", "float16": "<f2", "half": "<f2", "bfloat16": _BF16,
    "float64": "<f8", "double": "<f8", "int64": "<i8", "long": "<i8", "int32": "<i4",
    "int": "<i4", "int16": "<i2", "short": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
    "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "complex64": "<c8",
    "complex128": "<c16", "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}  # fmt: skip
_STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")  # UntypedStorage: torch.storage
_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 pickles' names


@dataclasses.dataclass
class TorchFile:
    """What :func:`read_torch_file` found.

    Attributes:
      tensors: Flat ``{state-dict key: array}`` in the stored dtype (bfloat16 as
        ``ml_dtypes.bfloat16``), contiguous and owning its memory.
      extra: JSON-like facts: ``format`` (``"zip"``, ``"legacy"`` or ``"pickle"``),
        ``entry`` (the top-level key read, ``None`` for a bare state dict or module),
        ``entries`` and ``other`` (the top-level keys, and the tensor-free ones' values),
        ``class_name`` / ``init_args`` / ``init_kwargs`` for a persistent-class module.
    """

    tensors: dict[str, np.ndarray]
    extra: dict[str, Any]


class _Stub:
    """Inert stand-in for an object of a module class: keeps its pickled ``__dict__``."""

    qualname, persistent, state = "?", False, types.MappingProxyType({})

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = dict(state) if isinstance(state, Mapping) else {}


@functools.cache
def _stub_class(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (_Stub,), {"qualname": qualname})


class _Marker(NamedTuple):
    """Stand-in for a class only passed as an argument (``torch.Tensor``, dtypes...)."""

    name: str
    dtype: np.dtype | None = None


class _Storage:
    """A lazily read torch storage of ``numel`` elements of ``dtype``."""

    def __init__(self, dtype: np.dtype, numel: int, what: str):
        self.dtype, self.numel, self.what = dtype, int(numel), what
        self.load: Callable[[], bytes] | None = None
        self.swap, self.array = False, None

    def read(self) -> np.ndarray:
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
class _Tensor:
    """A lazy tensor: a strided view into a :class:`_Storage` (offset and strides in elements)."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype

    def numpy(self, key: str) -> np.ndarray:
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


def _is_dtype(x: Any) -> bool:
    """Whether ``x`` is one of this module's torch dtype / storage class stand-ins."""
    return isinstance(x, _Marker) and x.dtype is not None


def _rebuild(storage: Any, offset: int, size: tuple, stride: tuple, *_: Any) -> _Tensor:
    """``torch._utils._rebuild_tensor`` / ``_v2`` (requires_grad, hooks, metadata unused)."""
    if not isinstance(storage, _Storage):
        raise WeightsError(f"malformed tensor record: storage {storage!r}")
    sizes, strides = tuple(map(int, size)), tuple(map(int, stride))
    return _Tensor(storage, int(offset), sizes, strides, storage.dtype)


def _rebuild_v3(storage, offset, size, stride, grad, hooks, dtype, *_: Any) -> _Tensor:
    """``torch._utils._rebuild_tensor_v3``: the dtype comes apart from the (byte) storage."""
    if not _is_dtype(dtype):
        raise WeightsError(f"malformed tensor record: dtype {dtype!r}")
    return dataclasses.replace(_rebuild(storage, offset, size, stride), dtype=dtype.dtype)


def _persistent_obj(meta: Any) -> _Stub:
    """``torch_utils.persistence._reconstruct_persistent_obj``, minus running its source."""
    if not isinstance(meta, Mapping) or meta.get("type") != "class":
        raise WeightsError(f"unsupported persistent object record {type(meta).__name__}")
    obj = _stub_class(str(meta.get("class_name")))()
    obj.__setstate__(meta.get("state") or {})
    obj.persistent = True
    return obj


def _bytes(data: Any) -> bytes:
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
    return np.frombuffer(_bytes(data), dtype, count=1)[0]


def _np_reconstruct(subtype: _Marker, shape: Any, dtype: Any) -> np.ndarray:
    if subtype != _Marker("numpy.ndarray"):
        raise WeightsError(f"refusing numpy array subclass {subtype!r}")
    # numpy pickles (0,) here and BUILD sets the real shape from the data, which numpy
    # checks; ignoring ``shape`` keeps a forged one from allocating memory.
    return np.ndarray.__new__(np.ndarray, (0,), dtype)


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    arr = np.frombuffer(_bytes(buf), dtype if isinstance(dtype, np.dtype) else _np_dtype(dtype))
    return arr.reshape(shape, order=order).copy()


_GLOBALS: dict[tuple[str, str], Any] = {
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
    ("torch", "Tensor"): _Marker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.Parameter"),
    ("torch", "Size"): tuple,
    ("torch", "device"): lambda *args: ":".join(map(str, args)),
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_obj,
    ("dnnlib.util", "EasyDict"): dict,
    ("dnnlib", "EasyDict"): dict,
    ("argparse", "Namespace"): _stub_class("argparse.Namespace"),  # DiT/SiT "args" entry
    ("numpy", "dtype"): _np_dtype,
    ("numpy", "ndarray"): _Marker("numpy.ndarray"),  # only as _reconstruct's argument
    **{(f"numpy.{m}.multiarray", "scalar"): _np_scalar for m in ("core", "_core")},
    **{(f"numpy.{m}.multiarray", "_reconstruct"): _np_reconstruct for m in ("core", "_core")},
    **{(f"numpy.{m}.numeric", "_frombuffer"): _np_frombuffer for m in ("core", "_core")},
}


class _Unpickler(pickle.Unpickler):
    """An unpickler whose globals and persistent ids are resolved by the given callables."""

    def __init__(self, f: io.BytesIO, find: Callable, persistent_load: Callable):
        super().__init__(f)
        self._find, self._persistent_load = find, persistent_load

    def find_class(self, module: str, name: str) -> Any:
        return self._find(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent_load(pid)


class _Reader:
    """Parses one file (and the legacy streams embedded in it) into stubs and lazy tensors."""

    def __init__(self):
        self.format = "pickle"

    def find_class(self, module: str, name: str) -> Any:
        module = _ALIASES.get(module, module)
        kind = name.removesuffix("Storage")
        if module in _STORAGE_MODULES and name.endswith("Storage") and kind in _STORAGES:
            return _Marker(f"torch.{name}", np.dtype(_STORAGES[kind]))
        if module == "torch" and name in _DTYPES:
            return _Marker(f"torch.{name}", np.dtype(_DTYPES[name]))
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return self.from_bytes
        if module.startswith("torch.nn.modules.") and name.isidentifier():
            return _stub_class(f"{module}.{name}")
        if (module, name) in _GLOBALS:
            return _GLOBALS[module, name]
        raise WeightsError(
            f"refusing to load global '{module}.{name}': only tensors, containers and module "
            "state are read, never code (the file may be malicious, or hold an object outside "
            "this reader's allow-list)"
        )

    def no_ids(self, pid: Any) -> Any:
        raise WeightsError(f"unexpected persistent id {pid!r} outside a torch.save stream")

    def load(self, f: io.BytesIO, persistent_load: Callable | None = None) -> Any:
        return _Unpickler(f, self.find_class, persistent_load or self.no_ids).load()

    def read(self, f: Any) -> Any:
        head = f.read(512)
        f.seek(0)
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            return self.read_zip(f)
        if head[257:262] == b"ustar":
            raise WeightsError("the pre-1.0 tar format of torch.save is not supported")
        blob = io.BytesIO(f.read())  # in memory, so a bad length can never over-allocate
        first = self.load(blob)
        if type(first) is int and first == _LEGACY_MAGIC:
            self.format = "legacy"
            return self.read_legacy(blob)
        return first

    def from_bytes(self, data: bytes) -> Any:
        """``torch.storage._load_from_bytes``: the legacy stream plain pickles embed."""
        f = io.BytesIO(bytes(data))
        if self.load(f) != _LEGACY_MAGIC:
            raise WeightsError("embedded storage bytes lack the torch.save magic number")
        return self.read_legacy(f)

    def read_legacy(self, f: io.BytesIO) -> Any:
        if self.load(f) != _LEGACY_PROTOCOL:
            raise WeightsError(f"unsupported legacy torch.save protocol (not {_LEGACY_PROTOCOL})")
        info = self.load(f)
        swap = isinstance(info, Mapping) and info.get("little_endian") is False
        storages: dict[str, _Storage] = {}

        def persistent_load(pid: tuple) -> Any:
            kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
            if kind == "module" and len(pid) == 4:  # torch.save(model): the class itself
                return pid[1]
            if kind != "storage" or len(pid) != 6 or not _is_dtype(pid[1]):
                raise WeightsError(f"unknown persistent id {pid!r}")
            if pid[5] is not None:
                raise WeightsError("pre-1.0 storage views are not supported")
            key = str(pid[2])
            return storages.setdefault(key, _Storage(pid[1].dtype, pid[4], repr(key)))

        obj = self.load(f, persistent_load)
        for key in self.load(f):  # then each storage: its int64 numel, then its bytes
            head, st = f.read(8), storages.get(str(key))
            if len(head) < 8:
                raise WeightsError("the storage data ends early (the file is truncated)")
            (numel,) = struct.unpack(">q" if swap else "<q", head)
            if st is None or st.numel != numel:
                raise WeightsError(f"storage record {key!r} does not match the pickled tensors")
            pos, nbytes = f.tell(), numel * st.dtype.itemsize
            st.load, st.swap = (lambda pos=pos, n=nbytes: (f.seek(pos), f.read(n))[1]), swap
            f.seek(pos + nbytes)
        return obj

    def read_zip(self, f: Any) -> Any:
        self.format = "zip"
        try:
            archive = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise WeightsError(
                f"damaged or truncated zip archive ({e}); download it again"
            ) from None
        names = set(archive.namelist())
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise WeightsError("a zip archive without one '<name>/data.pkl': not a torch.save file")
        prefix = pkls[0].removesuffix("data.pkl")
        order = prefix + "byteorder"  # absent in old files, which were little-endian
        swap = order in names and _record(archive, order).strip() == b"big"
        storages: dict[str, _Storage] = {}

        def persistent_load(pid: tuple) -> _Storage:
            if len(pid) != 5 or pid[0] != "storage" or not _is_dtype(pid[1]):
                raise WeightsError(f"unknown persistent id {pid!r}")
            name = f"{prefix}data/{pid[2]}"
            if name not in storages:
                storages[name] = st = _Storage(pid[1].dtype, pid[4], repr(name))
                st.load, st.swap = (lambda: _record(archive, name)), swap
            return storages[name]

        return self.load(io.BytesIO(_record(archive, pkls[0])), persistent_load)


def _record(archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        return archive.read(name)
    except KeyError:
        raise WeightsError(
            f"storage record '{name}' is missing from the archive (the file is truncated or "
            "damaged; download it again)"
        ) from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise WeightsError(f"record '{name}' is damaged ({e}); download it again") from None


def _select(obj: Any, entry: str | None) -> tuple[Any, str | None]:
    keys = [str(k) for k in obj][:12] if isinstance(obj, Mapping) else type(obj).__name__
    if entry is not None:
        if isinstance(obj, Mapping) and entry in obj:
            return obj[entry], entry
        raise WeightsError(f"no top-level entry {entry!r} (the file holds {keys})")
    if isinstance(obj, Mapping) and not all(isinstance(v, _Tensor) for v in obj.values()):
        for key in ("ema", "model"):
            if key in obj:
                return obj[key], key
        raise WeightsError(
            f"neither a state dict nor a checkpoint with an 'ema' or 'model' entry (top-level "
            f"entries {keys}); pass entry=<name> to choose one"
        )
    return obj, None


def _flatten(node: Any, prefix: str, out: dict[str, _Tensor], top: str = "") -> None:
    """Walks a state dict (nested mappings) or module tree into ``state_dict()`` names."""
    if isinstance(node, _Tensor) and prefix:
        out[prefix] = node
        return
    if isinstance(node, _Stub) and "_parameters" in node.state:
        # torch's order: parameters, persistent buffers, then the children in turn.
        state, skip = node.state, set(node.state.get("_non_persistent_buffers_set") or ())
        params, buffers = state.get("_parameters") or {}, state.get("_buffers") or {}
        node = {**params, **{k: v for k, v in buffers.items() if k not in skip}}
        node.update(state.get("_modules") or {})
    elif not isinstance(node, Mapping):
        what = node.qualname if isinstance(node, _Stub) else type(node).__name__
        raise WeightsError(
            f"{f'key {prefix!r}' if prefix else top} is a {what}, not a tensor, state dict or "
            "module; pass entry=<name> to choose another top-level entry"
        )
    for name, value in node.items():
        if value is not None:  # unset parameters/buffers/submodules (e.g. bias=False)
            _flatten(value, f"{prefix}.{name}" if prefix else str(name), out)


def _has_tensor(x: Any, seen: set[int]) -> bool:
    if id(x) in seen:
        return False
    seen.add(id(x))
    x = x.state if isinstance(x, _Stub) else x
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (list, tuple, set, frozenset)):
        return any(_has_tensor(v, seen) for v in x)
    return isinstance(x, (_Tensor, _Storage))


def _json(x: Any, depth: int = 0) -> Any:
    """A JSON-like copy of pickled metadata (numpy numbers as numbers, objects summarised)."""
    if depth > 40:
        return "..."
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (np.generic, np.ndarray)) and x.dtype.kind in "biuf":
        return x.tolist()
    if isinstance(x, _Stub) and x.persistent:
        args = {k: _json(x.state.get(f"_{k}"), depth + 1) for k in ("init_args", "init_kwargs")}
        return {"class_name": x.qualname, **args}
    if isinstance(x, _Stub):
        return {"class_name": x.qualname, "state": _json(x.state, depth + 1)}
    if isinstance(x, Mapping):
        return {str(k): _json(v, depth + 1) for k, v in x.items()}
    if isinstance(x, _Marker):  # a torch dtype, say
        return x.name
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_json(v, depth + 1) for v in x]
    if isinstance(x, _Tensor):
        return f"<tensor {list(x.size)} {x.dtype}>"
    return f"<{len(x)} bytes>" if isinstance(x, (bytes, bytearray)) else repr(x)


def _read(f: Any, entry: str | None) -> TorchFile:
    reader = _Reader()
    obj = reader.read(f)
    root, used = _select(obj, entry)
    flat: dict[str, _Tensor] = {}
    _flatten(root, "", flat, f"entry {used!r}" if used else "the pickled object")
    if not flat:
        raise WeightsError(f"{f'entry {used!r}' if used else 'the file'} holds no tensors")
    # Each storage is read once and dropped after its last tensor, to bound peak memory.
    uses = collections.Counter(id(t.storage) for t in flat.values())
    tensors = {}
    for key, tensor in flat.items():
        tensors[key] = tensor.numpy(key)
        uses[id(tensor.storage)] -= 1
        if not uses[id(tensor.storage)]:
            tensor.storage.array = None
    extra: dict[str, Any] = {"format": reader.format, "entry": used}
    if used is not None:
        extra["entries"] = [str(k) for k in obj]
        extra["other"] = {
            str(k): _json(v) for k, v in obj.items() if k != used and not _has_tensor(v, set())
        }
    if isinstance(root, _Stub):
        extra.update({k: v for k, v in _json(root).items() if k != "state"})
    return TorchFile(tensors, extra)


def read_torch_file(path: str | os.PathLike, entry: str | None = None) -> TorchFile:
    """Reads the tensors of a PyTorch checkpoint or pickled network, without torch.

    Args:
      path: A ``torch.save`` file (zip or legacy format) or a plain pickle of a network
        (local path or bucket URL).
      entry: The top-level key to read (e.g. ``"ema"``, ``"model"``). ``None`` reads a bare
        state dict or module as is, else the ``"ema"`` entry if present, else ``"model"``.

    Returns:
      A :class:`TorchFile`: the flat state dict and JSON-like ``extra`` facts.

    Raises:
      WeightsError: If the file is missing, not a PyTorch file, truncated or damaged,
        names a global outside the allow-list, or has no such entry.
    """
    path = str(path)
    try:
        with _files.open_file(path, "rb") as f:
            return _read(f, entry)
    except FileNotFoundError:
        raise WeightsError(f"{path}: file not found; pass a local path or gs:// URL") from None
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    except Exception as e:  # pickle, struct or numpy errors of a foreign or cut file
        raise WeightsError(
            f"{path}: not a readable PyTorch weight file ({type(e).__name__}: {e}); expected a "
            "torch.save checkpoint or a pickled network, complete and undamaged"
        ) from None


__all__ = ["TorchFile", "read_torch_file"]
