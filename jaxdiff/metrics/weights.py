"""Named-array weight files: deterministic ``.npz`` writing and SHA-256-checked loading.

Feature networks (the Inception FID network, the digits classifier) and reference
statistics are stored as plain ``.npz`` archives of named arrays, readable with
``numpy.load`` and no pickle. A variable tree is flattened to ``"/"``-joined keys
(``"params/Mixed_5b/branch1x1/conv/kernel"``).

:func:`save_arrays` writes the archive byte-for-byte deterministically (sorted keys, fixed
zip timestamps, little-endian arrays, no compression), so the same arrays always give the
same file and the same SHA-256: a checksum pinned in the code identifies the content.

Every read and write goes through :mod:`jaxdiff.utils.storage`, so any path may be local
or a bucket URL (``gs://bucket/fid_inception.npz``); writes are atomic on both.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdiff.utils import storage

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class ChecksumMismatchError(ValueError):
    """A weights file's SHA-256 is not the expected one."""


def file_sha256(path: str | os.PathLike) -> str:
    """Returns the hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with storage.open_file(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str | None, *, what: str = "file") -> str:
    """Checks a file's SHA-256.

    Args:
      path: The file (local or a bucket URL).
      expected: Expected hex digest (case-insensitive), or None to skip the check.
      what: What the file is, for the error message.

    Returns:
      The actual hex digest.

    Raises:
      ChecksumMismatchError: Naming the path and both digests.
    """
    actual = file_sha256(path)
    check_sha256(actual, expected, path=path, what=what)
    return actual


def check_sha256(
    actual: str, expected: str | None, *, path: str | os.PathLike, what: str = "file"
) -> None:
    """Compares a digest already computed (e.g. of bytes read once) with the expected one.

    Args:
      actual: The file's hex SHA-256.
      expected: Expected hex digest (case-insensitive), or None to skip the check.
      path: The file, for the error message.
      what: What the file is, for the error message.

    Raises:
      ChecksumMismatchError: Naming the path and both digests.
    """
    if expected is not None and actual != expected.lower():
        raise ChecksumMismatchError(
            f"{what} {os.fspath(path)!r} has SHA-256 {actual}, expected {expected.lower()}: "
            "the file is corrupt, truncated or a different version. Re-create it, or pass "
            "expected_sha256=<its hash> (or None to skip the check) if you trust it."
        )


def arrays_to_bytes(arrays: Mapping[str, Any]) -> bytes:
    """The deterministic, uncompressed ``.npz`` bytes of named arrays (see the module doc).

    Args:
      arrays: Names to arrays (or array-likes; strings become 0-d unicode arrays).

    Returns:
      The archive's bytes: equal arrays always give equal bytes.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            arr = np.asarray(arrays[name])  # write_array stores C order; 0-d stays 0-d
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    return buf.getvalue()


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, Any]) -> str:
    """Writes named arrays as a deterministic, uncompressed ``.npz``; returns its SHA-256.

    The archive is a standard numpy ``.npz`` (``numpy.load`` reads it). It is built in
    memory and written with :func:`jaxdiff.utils.storage.write_bytes` (atomic, local or
    bucket), so readers never see a partial file.

    Args:
      path: Output path, local or a bucket URL (used as given: no ``.npz`` is appended).
      arrays: Names to arrays (or array-likes; strings become 0-d unicode arrays).

    Returns:
      The hex SHA-256 of the written file.
    """
    data = arrays_to_bytes(arrays)
    storage.write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_arrays(
    path: str | os.PathLike, *, expected_sha256: str | None = None, what: str = "weights file"
) -> dict[str, np.ndarray]:
    """Reads an ``.npz`` of named arrays, optionally checking its SHA-256 first.

    The file is read once (local or bucket); the checksum is taken of those bytes, so
    what is checked is exactly what is parsed.

    Args:
      path: The file.
      expected_sha256: Expected hex digest, or None to skip the check.
      what: What the file is, for error messages.

    Returns:
      Names to numpy arrays (pickled objects are refused).

    Raises:
      FileNotFoundError: If the file does not exist.
      ChecksumMismatchError: If the digest differs from ``expected_sha256``, the archive
        is unreadable, or a floating-point array holds NaN or inf (weights and
        statistics never do; a file that does is corrupt and is never used).
    """
    if not storage.isfile(path):
        raise FileNotFoundError(f"{what} {os.fspath(path)!r} does not exist")
    data = storage.read_bytes(path)
    check_sha256(hashlib.sha256(data).hexdigest(), expected_sha256, path=path, what=what)
    return arrays_from_bytes(data, path=path, what=what)


def arrays_from_bytes(
    data: bytes, *, path: str | os.PathLike = "<bytes>", what: str = "weights file"
) -> dict[str, np.ndarray]:
    """Parses ``.npz`` bytes into named arrays, refusing pickles, bad archives and NaN/inf.

    Args:
      data: The archive's bytes.
      path: Where they came from, for error messages.
      what: What the file is, for error messages.

    Returns:
      Names to numpy arrays.

    Raises:
      ChecksumMismatchError: If the archive is unreadable or a float array is not finite.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ChecksumMismatchError(f"{what} {os.fspath(path)!r} is unreadable: {e}") from e
    for name, array in arrays.items():
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise ChecksumMismatchError(
                f"{what} {os.fspath(path)!r}: array {name!r} holds NaN or inf; the file is "
                "corrupt: re-create it"
            )
    return arrays
