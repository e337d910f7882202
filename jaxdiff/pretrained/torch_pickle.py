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
stand-in (:mod:`jaxdiff.pretrained.torch_globals`). Module classes become ``Stub``
records of their ``__dict__``; embedded source code is never executed. Tensors stay lazy
references until the chosen entry is flattened into state-dict names, so optimizer
states are never read.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxdiff.pretrained.torch_globals import (
    ALIASES,
    DTYPES,
    GLOBALS,
    STORAGE_MODULES,
    STORAGES,
    Marker,
    Storage,
    Stub,
    Tensor,
    is_dtype,
    stub_class,
)
from jaxdiff.pretrained.weights_io import WeightsError
from jaxdiff.utils import storage as _files

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


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
        module = ALIASES.get(module, module)
        kind = name.removesuffix("Storage")
        if module in STORAGE_MODULES and name.endswith("Storage") and kind in STORAGES:
            return Marker(f"torch.{name}", np.dtype(STORAGES[kind]))
        if module == "torch" and name in DTYPES:
            return Marker(f"torch.{name}", np.dtype(DTYPES[name]))
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return self.from_bytes
        if module.startswith("torch.nn.modules.") and name.isidentifier():
            return stub_class(f"{module}.{name}")
        if (module, name) in GLOBALS:
            return GLOBALS[module, name]
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
        storages: dict[str, Storage] = {}

        def persistent_load(pid: tuple) -> Any:
            kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
            if kind == "module" and len(pid) == 4:  # torch.save(model): the class itself
                return pid[1]
            if kind != "storage" or len(pid) != 6 or not is_dtype(pid[1]):
                raise WeightsError(f"unknown persistent id {pid!r}")
            if pid[5] is not None:
                raise WeightsError("pre-1.0 storage views are not supported")
            key = str(pid[2])
            return storages.setdefault(key, Storage(pid[1].dtype, pid[4], repr(key)))

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
        storages: dict[str, Storage] = {}

        def persistent_load(pid: tuple) -> Storage:
            if len(pid) != 5 or pid[0] != "storage" or not is_dtype(pid[1]):
                raise WeightsError(f"unknown persistent id {pid!r}")
            name = f"{prefix}data/{pid[2]}"
            if name not in storages:
                storages[name] = st = Storage(pid[1].dtype, pid[4], repr(name))
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
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in ("ema", "model"):
            if key in obj:
                return obj[key], key
        raise WeightsError(
            f"neither a state dict nor a checkpoint with an 'ema' or 'model' entry (top-level "
            f"entries {keys}); pass entry=<name> to choose one"
        )
    return obj, None


def _flatten(node: Any, prefix: str, out: dict[str, Tensor], top: str = "") -> None:
    """Walks a state dict (nested mappings) or module tree into ``state_dict()`` names."""
    if isinstance(node, Tensor) and prefix:
        out[prefix] = node
        return
    if isinstance(node, Stub) and "_parameters" in node.state:
        # torch's order: parameters, persistent buffers, then the children in turn.
        state, skip = node.state, set(node.state.get("_non_persistent_buffers_set") or ())
        params, buffers = state.get("_parameters") or {}, state.get("_buffers") or {}
        node = {**params, **{k: v for k, v in buffers.items() if k not in skip}}
        node.update(state.get("_modules") or {})
    elif not isinstance(node, Mapping):
        what = node.qualname if isinstance(node, Stub) else type(node).__name__
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
    x = x.state if isinstance(x, Stub) else x
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (list, tuple, set, frozenset)):
        return any(_has_tensor(v, seen) for v in x)
    return isinstance(x, (Tensor, Storage))


def _json(x: Any, depth: int = 0) -> Any:
    """A JSON-like copy of pickled metadata (numpy numbers as numbers, objects summarised)."""
    if depth > 40:
        return "..."
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (np.generic, np.ndarray)) and x.dtype.kind in "biuf":
        return x.tolist()
    if isinstance(x, Stub) and x.persistent:
        args = {k: _json(x.state.get(f"_{k}"), depth + 1) for k in ("init_args", "init_kwargs")}
        return {"class_name": x.qualname, **args}
    if isinstance(x, Stub):
        return {"class_name": x.qualname, "state": _json(x.state, depth + 1)}
    if isinstance(x, Mapping):
        return {str(k): _json(v, depth + 1) for k, v in x.items()}
    if isinstance(x, Marker):  # a torch dtype, say
        return x.name
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_json(v, depth + 1) for v in x]
    if isinstance(x, Tensor):
        return f"<tensor {list(x.size)} {x.dtype}>"
    return f"<{len(x)} bytes>" if isinstance(x, (bytes, bytearray)) else repr(x)


def _read(f: Any, entry: str | None) -> TorchFile:
    reader = _Reader()
    obj = reader.read(f)
    root, used = _select(obj, entry)
    flat: dict[str, Tensor] = {}
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
    if isinstance(root, Stub):
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
