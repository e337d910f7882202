"""Reference and sample batches in the ADM evaluator's ``.npz`` layout.

openai/guided-diffusion's ``evaluations/evaluator.py`` reads one ``.npz`` per side, and
its published reference batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``) use this
layout, so they load here directly:

============  ======================  ====================================================
key           dtype, shape            meaning
============  ======================  ====================================================
``arr_0``     uint8 ``[N, H, W, 3]``  images in [0, 255]; always present for ADM, which
                                      takes precision/recall (and IS) from them
``arr_1``     int ``[N]``             class labels (optional; ``image_sample.py`` writes
                                      them for class-conditional samples)
``mu``        float ``[2048]``        mean of the Inception pool3 features
``sigma``     float ``[2048, 2048]``  their covariance (``numpy.cov``, ``N - 1``)
``mu_s``      float ``[2023]``        mean of the spatial (sFID) features,
                                      :func:`jaxdiff.metrics.scores.adm_spatial_features`
``sigma_s``   float ``[2023, 2023]``  their covariance
============  ======================  ====================================================

ADM uses the stored statistics instead of computing them from ``arr_0`` whenever ``mu``
is present, and then reads all four, so :func:`save_adm_reference` writes either none of
the statistics or all four. Reading is lenient: a file with only ``mu``/``sigma`` (or
only images) loads. Every problem (not an archive, a missing or half-present key, a
wrong dtype or shape, NaN/inf, a pickled array, a corrupt member) raises ``ValueError``
naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np
from jax.typing import ArrayLike

from jaxdiff.metrics.statistics import ReferenceStatistics
from jaxdiff.metrics.weights import save_arrays
from jaxdiff.utils import storage

ADM_POOL_FEATURE = "inception_v3_pool3"
"""Feature space of ``mu``/``sigma`` (the same name as the FID evaluator's)."""

ADM_SPATIAL_FEATURE = "inception_v3_mixed6_spatial7"
"""Feature space of ``mu_s``/``sigma_s``: ADM's ``mixed_6/conv[..., :7]``, flattened."""

_STAT_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))
_ZIP_MAGIC = b"PK\x03\x04"


@dataclasses.dataclass(frozen=True, eq=False)
class AdmBatch:
    """The contents of an ADM ``.npz`` batch; absent keys are None.

    Attributes:
      images: uint8 ``[N, H, W, 3]`` (``arr_0``), or None if absent or not loaded.
      labels: int64 ``[N]`` (``arr_1``), or None.
      mu: float64 ``[D]`` pool3 mean, or None.
      sigma: float64 ``[D, D]`` pool3 covariance, or None.
      mu_s: float64 ``[Ds]`` spatial mean, or None.
      sigma_s: float64 ``[Ds, Ds]`` spatial covariance, or None.
      path: The file it was read from (``""`` if built in memory).
    """

    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    path: str = ""

    def _stats(self, mu_key: str, sigma_key: str, feature: str, evaluator: str):
        mu, sigma = getattr(self, mu_key), getattr(self, sigma_key)
        if mu is None:
            raise ValueError(
                f"ADM batch {self.path or '<memory>'!r} holds no {mu_key!r}/{sigma_key!r}: "
                "compute the statistics from its images' features instead"
            )
        return ReferenceStatistics(
            mu, sigma, evaluator=evaluator, feature=feature, source=f"ADM batch {self.path}"
        )

    def statistics(self) -> ReferenceStatistics:
        """Pool3 (FID) statistics ``mu``/``sigma``; raises ValueError if absent."""
        return self._stats("mu", "sigma", ADM_POOL_FEATURE, "fid")

    def spatial_statistics(self) -> ReferenceStatistics:
        """Spatial (sFID) statistics ``mu_s``/``sigma_s``; raises ValueError if absent."""
        return self._stats("mu_s", "sigma_s", ADM_SPATIAL_FEATURE, "sfid")


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{where}: 'arr_0' must be uint8 [N, H, W, 3] images in [0, 255], got "
            f"{images.dtype} {images.shape}; convert [-1, 1] floats with "
            "np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8)"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{where}: 'arr_0' holds no images")
    return images


def _check_labels(labels: np.ndarray, num_images: int | None, where: str) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise ValueError(
            f"{where}: 'arr_1' must be integer labels [N], got {labels.dtype} {labels.shape}"
        )
    if num_images is not None and labels.shape[0] != num_images:
        raise ValueError(
            f"{where}: 'arr_1' has {labels.shape[0]} labels for {num_images} images in 'arr_0'"
        )
    return labels.astype(np.int64)


def _check_pair(mu: np.ndarray, sigma: np.ndarray, keys: tuple[str, str], where: str):
    mu_key, sigma_key = keys
    for key, arr in ((mu_key, mu), (sigma_key, sigma)):
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{where}: {key!r} must be floating point, got {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: {key!r} holds NaN or inf; the file is corrupt")
    if mu.ndim != 1 or mu.shape[0] == 0 or sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(
            f"{where}: expected {mu_key!r} [D] and {sigma_key!r} [D, D], got {mu.shape} and "
            f"{sigma.shape}"
        )
    return mu.astype(np.float64), sigma.astype(np.float64)


def _read_member(npz, key: str, where: str) -> np.ndarray:
    try:
        return npz[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{where}: array {key!r} is unreadable ({e}); the file is corrupt") from e


def load_adm_reference(path: str | os.PathLike, *, images: bool = True) -> AdmBatch:
    """Reads an ADM reference or sample batch (see the module doc for the layout).

    Args:
      path: The ``.npz`` file, local or a bucket URL.
      images: Whether to load ``arr_0`` (and ``arr_1``); False reads only the
        statistics, which is fast even for a 10 000-image reference batch.

    Returns:
      The batch; keys the file lacks are None.

    Raises:
      FileNotFoundError: If the file does not exist.
      ValueError: Naming the file, if it is not an ``.npz``, is corrupt, holds neither
        ``arr_0`` nor ``mu``/``sigma``, holds half of a statistics pair, or has a key of
        the wrong dtype or shape.
    """
    where = f"ADM batch {os.fspath(path)!r}"
    if not storage.isfile(path):
        raise FileNotFoundError(f"{where} does not exist")
    with storage.open_file(path, "rb") as f:
        if f.read(4) != _ZIP_MAGIC:
            raise ValueError(f"{where} is not an .npz (zip) archive: re-download or re-create it")
        f.seek(0)
        try:
            npz = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{where} is unreadable ({e}); the file is corrupt") from e
        with npz:
            keys = set(npz.files)
            if "arr_0" not in keys and "mu" not in keys:
                raise ValueError(
                    f"{where} holds neither images 'arr_0' nor statistics 'mu'/'sigma' "
                    f"(it holds {sorted(keys)}): it is not an ADM reference or sample batch"
                )
            out: dict[str, np.ndarray] = {}
            for pair in _STAT_PAIRS:
                present = [k for k in pair if k in keys]
                if len(present) == 1:
                    missing = next(k for k in pair if k not in keys)
                    raise ValueError(f"{where} has {present[0]!r} but lacks {missing!r}")
                if present:
                    mu, sigma = (_read_member(npz, k, where) for k in pair)
                    out[pair[0]], out[pair[1]] = _check_pair(mu, sigma, pair, where)
            if images and "arr_0" in keys:
                out["images"] = _check_images(_read_member(npz, "arr_0", where), where)
            if images and "arr_1" in keys:
                num = out["images"].shape[0] if "images" in out else None
                out["labels"] = _check_labels(_read_member(npz, "arr_1", where), num, where)
    return AdmBatch(path=os.fspath(path), **out)


def save_adm_reference(
    path: str | os.PathLike,
    images: ArrayLike,
    *,
    labels: ArrayLike | None = None,
    mu: ArrayLike | None = None,
    sigma: ArrayLike | None = None,
    mu_s: ArrayLike | None = None,
    sigma_s: ArrayLike | None = None,
) -> str:
    """Writes a batch the ADM evaluator reads (deterministic bytes, atomic).

    Args:
      path: Output file, local or a bucket URL (used as given).
      images: uint8 ``[N, H, W, 3]`` images (``arr_0``); ADM always reads them.
      labels: Optional integer ``[N]`` class labels (``arr_1``).
      mu: Pool3 mean ``[D]``; give all four statistics or none.
      sigma: Pool3 covariance ``[D, D]``.
      mu_s: Spatial mean ``[Ds]``.
      sigma_s: Spatial covariance ``[Ds, Ds]``.

    Returns:
      The SHA-256 of the written file.

    Raises:
      ValueError: Naming the file, on a bad image array or labels, or statistics that are
        incomplete or of the wrong shape.
    """
    where = f"ADM batch {os.fspath(path)!r} (not written)"
    arrays: dict[str, np.ndarray] = {"arr_0": _check_images(np.asarray(images), where)}
    if labels is not None:
        arrays["arr_1"] = _check_labels(np.asarray(labels), arrays["arr_0"].shape[0], where)
    stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    given = sorted(k for k, v in stats.items() if v is not None)
    if given and len(given) != len(stats):
        raise ValueError(
            f"{where}: got statistics {given} but not {sorted(set(stats) - set(given))}; the "
            "ADM evaluator reads all four whenever 'mu' is present, so give all or none"
        )
    if given:
        for pair in _STAT_PAIRS:
            m, s = (np.asarray(stats[k]) for k in pair)
            arrays[pair[0]], arrays[pair[1]] = _check_pair(m, s, pair, where)
    return save_arrays(path, arrays)
