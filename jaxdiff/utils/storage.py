"""One path abstraction for every file jaxdiff reads or writes: local disk or cloud URLs.

Workdirs, checkpoints, metrics, grids, samples, statistics, weights and datasets may live
on local disk or in a bucket (``gs://bucket/run``, ``s3://...``). Everything goes through
:func:`as_path`, which returns an :class:`etils.epath.Path`:

* ``epath`` is what orbax already uses for checkpoints, so one abstraction covers both our
  files and orbax's, with no extra dependency;
* it keeps ``scheme://`` intact (``pathlib.Path("gs://b/x")`` silently becomes the local
  folder ``gs:/b/x``) and dispatches cloud URLs to fsspec (``pip install gcsfs`` for
  ``gs://``, ``s3fs`` for ``s3://``), so any fsspec filesystem -- including an in-memory
  fake in the tests -- plugs in without code changes.

Writes are atomic: a local file is written next to its destination and renamed into
place; a cloud object is uploaded in one request, which object stores publish whole or
not at all. A reader therefore never sees half a file.

Example::

    from jaxdiff.utils import storage

    run = storage.as_path("gs://bucket/run")      # or a local folder
    storage.write_text(run / "notes.txt", "hi")   # atomic on both
    storage.read_text(run / "notes.txt")
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterable
from typing import Any

from etils import epath

PathLike = str | os.PathLike

#: URL schemes epath (and so orbax) can reach; checkpoints are tested on ``gs://``.
SCHEMES = ("gs", "s3", "az", "hf")


def is_remote(path: PathLike) -> bool:
    """Whether ``path`` is a ``scheme://`` URL (a bucket) rather than a local path."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """Returns ``path`` as an ``epath.Path``; local paths are made absolute.

    Args:
        path: A local path (``~`` is expanded) or a URL such as ``gs://bucket/dir``.

    Returns:
        An ``epath.Path``; ``str()`` of it is the same URL for cloud paths.

    Raises:
        ValueError: For a URL whose scheme is not in :data:`SCHEMES`.
    """
    if isinstance(path, epath.Path) and is_remote(path):
        return path
    text = os.fspath(path)
    if is_remote(text):
        scheme = text.split("://", 1)[0]
        if scheme not in SCHEMES:
            # epath would quietly treat an unknown scheme as a local folder "scheme:/...".
            raise ValueError(
                f"unsupported storage URL {text!r}: scheme {scheme!r}:// is not one of "
                f"{', '.join(s + '://' for s in SCHEMES)}; use a local path or one of those"
            )
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def to_str(path: PathLike) -> str:
    """The canonical string of :func:`as_path` (``gs://...`` stays a URL)."""
    return os.fspath(as_path(path))


def join(path: PathLike, *parts: str) -> str:
    """Joins ``parts`` onto ``path``; returns the string form (URLs kept intact)."""
    return os.fspath(as_path(path).joinpath(*parts))


def exists(path: PathLike) -> bool:
    """Whether a file or folder exists at ``path``."""
    return as_path(path).exists()


def isdir(path: PathLike) -> bool:
    """Whether ``path`` is a folder (a prefix with objects under it, for buckets)."""
    return as_path(path).is_dir()


def isfile(path: PathLike) -> bool:
    """Whether ``path`` is a file (an object, for buckets)."""
    return as_path(path).is_file()


def makedirs(path: PathLike) -> epath.Path:
    """Creates folder ``path`` and its parents if needed; returns it as a path."""
    p = as_path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def listdir(path: PathLike) -> list[str]:
    """Names of the entries of folder ``path``, sorted."""
    return sorted(child.name for child in as_path(path).iterdir())


def open_file(path: PathLike, mode: str = "rb") -> Any:
    """Opens ``path`` for reading or (non-atomic) writing; prefer :func:`write_bytes`."""
    return as_path(path).open(mode)


def read_bytes(path: PathLike) -> bytes:
    """The contents of file ``path``."""
    return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
    """The contents of text file ``path`` (UTF-8)."""
    return as_path(path).read_text(encoding="utf-8")


def write_bytes(path: PathLike, data: bytes) -> str:
    """Writes ``data`` to ``path`` atomically, creating parent folders.

    Local files are written to a unique temporary name in the same folder and renamed
    over the destination (``os.replace``), so a crash leaves either the old file or the
    new one. Cloud objects are uploaded in one request, which is atomic by itself.

    Returns:
        The path written, as a string.
    """
    return write_chunks(path, [data])


def write_chunks(path: PathLike, chunks: Iterable[bytes | memoryview]) -> str:
    """:func:`write_bytes` of the concatenated ``chunks``, never joined in memory.

    For large files (converted weights): each chunk is written as it comes, so peak
    memory stays at one chunk. Atomic as :func:`write_bytes`.

    Returns:
        The path written, as a string.
    """
    p = as_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(p):
        with p.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
        return os.fspath(p)
    tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.fspath(p)


def write_text(path: PathLike, text: str) -> str:
    """Writes ``text`` (UTF-8) to ``path`` atomically; see :func:`write_bytes`."""
    return write_bytes(path, text.encode("utf-8"))


def append_text(path: PathLike, text: str) -> None:
    """Appends ``text`` to ``path``.

    Local files are appended in place. Object stores cannot append, so a cloud file is
    read and rewritten whole -- fine for small logs such as ``metrics.jsonl``.
    """
    p = as_path(path)
    if not is_remote(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a", encoding="utf-8") as f:
            f.write(text)
        return
    old = p.read_text(encoding="utf-8") if p.exists() else ""
    write_text(p, old + text)


def save_npz(path: PathLike, **arrays: Any) -> str:
    """Writes arrays as an ``.npz`` file at ``path`` atomically (local or cloud)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_bytes(path, buf.getvalue())


def load_npz(path: PathLike) -> dict[str, Any]:
    """Reads every array of the ``.npz`` file at ``path`` into a dict."""
    import numpy as np

    with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def remove(path: PathLike, *, missing_ok: bool = True) -> None:
    """Deletes file ``path``."""
    as_path(path).unlink(missing_ok=missing_ok)


def rmtree(path: PathLike, *, missing_ok: bool = True) -> None:
    """Deletes folder ``path`` and everything under it."""
    p = as_path(path)
    if p.exists():
        p.rmtree()
    elif not missing_ok:
        raise FileNotFoundError(os.fspath(p))
