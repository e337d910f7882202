"""Weight files of the FID Inception-v3 (:mod:`jaxdiff.metrics.inception`): find, check, load.

Weights are never downloaded. They come from a local ``.npz`` made once by
``python -m jaxdiff.metrics.convert_inception`` (see that module), found through the
``path`` argument or the ``JAXDIFF_INCEPTION_WEIGHTS`` environment variable (a local path
or a bucket URL such as ``gs://bucket/fid_inception.npz``: all I/O goes through
:mod:`jaxdiff.utils.storage`). Every load checks the file's SHA-256 and every variable's
name and shape against the network.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.metrics.weights import ChecksumMismatchError, load_arrays, save_arrays
from jaxdiff.utils import storage
from jaxdiff.utils.trees import flatten_tree, unflatten_tree

INCEPTION_WEIGHTS_ENV = "JAXDIFF_INCEPTION_WEIGHTS"
"""Environment variable naming the converted Inception ``.npz``."""

INCEPTION_SHA256: str | None = None
"""SHA-256 of the ``.npz`` that ``convert_inception`` writes from pytorch-fid's ``.pth``.

The conversion is deterministic (same ``.pth`` -> byte-identical ``.npz``), so this value
is well defined, but it is **not pinned yet**: neither PyTorch nor the ``.pth`` was
available where this code was written, so the hash could not be computed. While it is
None the loader checks the file against the ``<file>.sha256`` the converter writes beside
it (catching corruption and truncation, not provenance) and always checks every
parameter's name and shape. Once someone converts the official file, paste the printed
hash here; until then pass ``expected_sha256=`` to pin it yourself.
"""

PTH_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
PTH_SHA256_PREFIX = "6726825d"
"""First 8 hex digits of the SHA-256 of pytorch-fid's published ``.pth``.

The file is published under torch.hub's naming convention, ``<name>-<prefix>.pth``, where
the prefix is the start of the file's SHA-256 (what ``torch.hub``'s ``check_hash=True``
verifies). ``convert_inception`` checks the source file against it. The full 64-digit
hash is not pinned: the file could not be downloaded where this code was written.
"""
PTH_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PTH_FILENAME

_DEFAULT = object()


class InceptionWeightsNotFoundError(FileNotFoundError):
    """No converted Inception weights file was given or found."""


def _how_to_get_weights(reason: str) -> str:
    return (
        f"{reason}. FID needs the standard FID Inception weights, converted once to .npz:\n"
        f"  1. download {PTH_FILENAME} from {PTH_URL}\n"
        "  2. pip install torch  (only the converter needs it)\n"
        f"  3. python -m jaxdiff.metrics.convert_inception --pth=/path/to/{PTH_FILENAME} "
        "--out=/path/to/fid_inception.npz\n"
        f"  4. export {INCEPTION_WEIGHTS_ENV}=/path/to/fid_inception.npz  "
        "(or pass inception_weights=/path/to/fid_inception.npz)\n"
        "Without weights, use the offline evaluator 'fd_digits' (FD-digits, not FID)."
    )


@functools.cache
def inception_variable_shapes() -> dict[str, tuple[int, ...]]:
    """Flat ``{"params/Mixed_5b/...": shape}`` of every variable (no compute, no RNG)."""
    # Imported here, not at the top: jaxdiff.metrics.inception re-exports this module, so a
    # module-level import of the network would be circular.
    from jaxdiff.metrics.inception import INPUT_SIZE, InceptionV3

    shapes = jax.eval_shape(
        InceptionV3().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
    )
    return {
        "/".join(str(k.key) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
    }


def random_inception_variables(seed: int = 0) -> dict[str, Any]:
    """He-normal conv kernels and identity BatchNorm: a stand-in for tests and timing.

    Built with numpy (no JAX RNG compile). Its features are NOT meaningful for FID.

    Args:
      seed: numpy seed.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 arrays.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in sorted(inception_variable_shapes().items()):
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            flat[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif leaf in ("scale", "var"):
            flat[name] = np.ones(shape, np.float32)
        else:
            flat[name] = np.zeros(shape, np.float32)
    return unflatten_tree(flat)


def save_inception_variables(path: str | os.PathLike, variables: Any) -> str:
    """Writes Inception variables to a deterministic ``.npz`` plus ``<path>.sha256``.

    Args:
      path: Output file.
      variables: ``{"params": ..., "batch_stats": ...}``.

    Returns:
      The file's SHA-256 (also written to ``<path>.sha256``).

    Raises:
      ValueError: If a variable is missing, extra or of the wrong shape.
    """
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_tree(variables).items()}
    _check_names_and_shapes(flat, path)
    digest = save_arrays(path, flat)
    storage.write_text(_sidecar(path), f"{digest}  {storage.as_path(path).name}\n")
    return digest


def _sidecar(path: str | os.PathLike) -> str:
    # String concatenation, not a path join: "<file>.sha256" sits next to the file, and a
    # bucket URL stays a URL.
    return f"{storage.to_str(path)}.sha256"


def resolve_weights_path(path: str | os.PathLike | None = None) -> str:
    """Finds the converted weights: ``path``, else ``$JAXDIFF_INCEPTION_WEIGHTS``.

    Returns:
      The file as a string: an absolute local path or a bucket URL.

    Raises:
      InceptionWeightsNotFoundError: Saying where to get and how to convert the weights.
    """
    if path is None:
        path = os.environ.get(INCEPTION_WEIGHTS_ENV) or None
        if path is None:
            raise InceptionWeightsNotFoundError(
                _how_to_get_weights(
                    f"no Inception weights given and ${INCEPTION_WEIGHTS_ENV} is unset"
                )
            )
    path = storage.to_str(path)  # expands "~"; keeps "gs://" intact
    if not storage.isfile(path):
        raise InceptionWeightsNotFoundError(
            _how_to_get_weights(f"Inception weights file {path!r} does not exist")
        )
    return path


def load_inception_variables(
    path: str | os.PathLike | None = None, *, expected_sha256: Any = _DEFAULT
) -> dict[str, Any]:
    """Loads converted FID Inception weights, checking checksum, names and shapes.

    Args:
      path: The ``.npz`` from ``convert_inception`` (local or a bucket URL); None reads
        ``$JAXDIFF_INCEPTION_WEIGHTS``.
      expected_sha256: Hex SHA-256 the file must have. Default: :data:`INCEPTION_SHA256`
        if pinned, else the digest in ``<path>.sha256`` if that file exists. None skips
        the checksum (names and shapes are still checked).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays.

    Raises:
      InceptionWeightsNotFoundError: No file; the message says how to make one.
      ChecksumMismatchError: Naming the path and both digests.
      ValueError: If a variable is missing, extra or of the wrong shape.
    """
    path = resolve_weights_path(path)
    if expected_sha256 is _DEFAULT:
        expected_sha256 = INCEPTION_SHA256
        if expected_sha256 is None and storage.isfile(_sidecar(path)):
            words = storage.read_text(_sidecar(path)).split()
            if not words:
                raise ChecksumMismatchError(
                    f"checksum file {_sidecar(path)!r} is empty: re-create the weights with "
                    "convert_inception, or delete it to skip the check"
                )
            expected_sha256 = words[0]
    # One read: the checksum is of the bytes that are parsed (87 MB, so not read twice).
    flat = load_arrays(path, expected_sha256=expected_sha256, what="Inception weights file")
    _check_names_and_shapes(flat, path)
    return unflatten_tree({k: v.astype(np.float32) for k, v in flat.items()})


def _check_names_and_shapes(flat: dict[str, np.ndarray], path: Any) -> None:
    want = inception_variable_shapes()
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    wrong = sorted(k for k in set(want) & set(flat) if tuple(flat[k].shape) != want[k])
    if missing or extra or wrong:
        detail = "; ".join(
            f"{label}: {names[:5]}{' ...' if len(names) > 5 else ''}"
            for label, names in (("missing", missing), ("unexpected", extra), ("bad shape", wrong))
            if names
        )
        raise ValueError(
            f"{os.fspath(path)!r} is not a converted FID Inception file ({detail}); "
            "re-create it with `python -m jaxdiff.metrics.convert_inception`"
        )


__all__ = [
    "INCEPTION_SHA256",
    "INCEPTION_WEIGHTS_ENV",
    "PTH_FILENAME",
    "PTH_URL",
    "InceptionWeightsNotFoundError",
    "inception_variable_shapes",
    "load_inception_variables",
    "random_inception_variables",
    "resolve_weights_path",
    "save_inception_variables",
]
