"""Feature statistics: a streaming float64 accumulator and the reference-statistics file.

:class:`RunningStatistics` accumulates the mean and covariance of features batch by batch
(Chan, Golub & LeVeque's pairwise update, in float64), so statistics of a data set never
need all its features in memory. :class:`ReferenceStatistics` is what the metrics read
and write: ``mu``/``sigma`` plus a description of where they came from.

File format (``FORMAT_VERSION`` 1): one ``.npz`` with deterministic bytes
(:func:`jaxdiff.metrics.weights.save_arrays`), local or in a bucket:

===============  ================  ==========================================================
key              dtype, shape      meaning
===============  ================  ==========================================================
``mu``           float64 ``[D]``   mean of the features
``sigma``        float64 ``[D,D]`` covariance, ``N - 1`` denominator (as ``numpy.cov``)
``num``          int64 ``[]``      number of examples N (0: unknown)
``evaluator``    str ``[]``        evaluator the features are for: ``"fid"``, ``"fd_digits"``
``feature``      str ``[]``        feature space: ``"inception_v3_pool3"``,
                                   ``"digits_classifier:<sha256[:12]>"``
``image_shape``  int64 ``[k]``     shape of one input image, e.g. ``[32, 32, 3]``
``source``       str ``[]``        the data, e.g. ``"cifar10 split=train"``
``version``      int64 ``[]``      format version
===============  ================  ==========================================================

jaxdiff writes every key (``""``, ``0`` or an empty shape when unknown). Only ``mu`` and
``sigma`` are needed to read a file, so pytorch-fid ``--save-stats`` and EDM reference
files load too, with the other fields unknown; and those tools read only ``mu`` and
``sigma``, so they can read ours.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from jax.typing import ArrayLike

from jaxdiff.metrics.weights import load_arrays, save_arrays

FORMAT_VERSION = 1
"""Version of the reference-statistics file this code writes (and the newest it reads)."""

_STRING_KEYS = ("evaluator", "feature", "source")


class RunningStatistics:
    """Mean and covariance of features streamed in batches, exactly, in float64.

    Each batch's own mean and centred scatter matrix are merged into the running ones
    with the pairwise update of Chan et al. (1979): for sets ``a`` and ``b`` with
    ``delta = mean_b - mean_a``, ``M2 = M2_a + M2_b + delta delta^T n_a n_b / n``. No sum
    of raw squares is ever formed, so features with a large mean lose no precision
    (the textbook ``E[x x^T] - mu mu^T`` would cancel catastrophically), and the result
    equals ``numpy.cov`` of all features to round-off for any batch split.

    Example:
      >>> acc = RunningStatistics()
      >>> for batch in np.split(np.arange(12.0).reshape(6, 2), 3):
      ...     acc.update(batch)
      >>> acc.num, acc.mean().tolist()
      (6, [5.0, 6.0])
    """

    def __init__(self) -> None:
        self.num = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def update(self, features: ArrayLike) -> None:
        """Adds a batch ``[B, ...]`` of features (flattened to ``[B, D]``; B may be 0)."""
        x = np.asarray(features, np.float64)
        x = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))  # "-1" fails on empty batches
        if x.shape[0] == 0:
            return
        mean = x.mean(axis=0)
        centred = x - mean
        self._merge(x.shape[0], mean, centred.T @ centred)

    def merge(self, other: RunningStatistics) -> None:
        """Adds the examples accumulated by ``other`` (e.g. another process's part)."""
        if other.num:
            self._merge(other.num, other._mean, other._m2)

    def _merge(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if self._mean is None:
            self.num, self._mean, self._m2 = n_b, mean_b.copy(), m2_b.copy()
            return
        if mean_b.shape != self._mean.shape:
            raise ValueError(
                f"feature size changed from {self._mean.shape[0]} to {mean_b.shape[0]} "
                "between batches: every batch must give features of the same size"
            )
        n_a, n = self.num, self.num + n_b
        delta = mean_b - self._mean
        self._mean += delta * (n_b / n)
        self._m2 += m2_b + np.outer(delta, delta * (n_a * n_b / n))
        self.num = n

    def mean(self) -> np.ndarray:
        """``[D]`` float64 mean of everything seen."""
        if self._mean is None:
            raise ValueError("no features were accumulated: the data set is empty")
        return self._mean.copy()

    def covariance(self) -> np.ndarray:
        """``[D, D]`` float64 covariance with the ``N - 1`` denominator (``numpy.cov``)."""
        if self.num < 2:
            raise ValueError(f"a covariance needs at least 2 examples, got {self.num}")
        sigma = self._m2 / (self.num - 1)
        return 0.5 * (sigma + sigma.T)  # exactly symmetric despite round-off


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceStatistics:
    """``mu``/``sigma`` of a feature set and where they came from; see the module doc.

    Attributes:
      mu: ``[D]`` float64 mean.
      sigma: ``[D, D]`` float64 covariance (``N - 1`` denominator).
      num: Number of examples (0: unknown, e.g. a pytorch-fid file).
      evaluator: Evaluator name the statistics are for (``"fid"``, ``"fd_digits"``).
      feature: Feature space name (``""``: unknown).
      image_shape: Shape of one input image (``()``: unknown).
      source: Description of the data.
      version: File format version.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num: int = 0
    evaluator: str = ""
    feature: str = ""
    image_shape: tuple[int, ...] = ()
    source: str = ""
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, np.float64)
        sigma = np.asarray(self.sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
            raise ValueError(f"expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))

    @classmethod
    def from_features(cls, features: ArrayLike, **metadata: Any) -> ReferenceStatistics:
        """Statistics of host features ``[N, ...]`` (e.g. ``SampleEvalResult.features``).

        Args:
          features: ``[N >= 2, ...]`` features (flattened per example).
          **metadata: The other fields (``evaluator=``, ``feature=``, ``source=``...);
            ``num`` is set from ``features``.
        """
        acc = RunningStatistics()
        acc.update(features)
        return cls.from_running(acc, **metadata)

    @classmethod
    def from_running(cls, acc: RunningStatistics, **metadata: Any) -> ReferenceStatistics:
        """Statistics of a :class:`RunningStatistics` (``num`` is set from it)."""
        return cls(acc.mean(), acc.covariance(), num=acc.num, **metadata)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The file's arrays by key (see the module doc)."""
        arrays: dict[str, np.ndarray] = {
            "mu": self.mu,
            "sigma": self.sigma,
            "num": np.asarray(self.num, np.int64),
            "image_shape": np.asarray(self.image_shape, np.int64).reshape(-1),
            "version": np.asarray(self.version, np.int64),
        }
        arrays.update({k: np.asarray(str(getattr(self, k))) for k in _STRING_KEYS})
        return arrays

    def save(self, path: str | os.PathLike) -> str:
        """Writes the file (deterministic bytes, atomic, local or bucket); returns its SHA-256."""
        return save_arrays(path, self.to_arrays())

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, expected_sha256: str | None = None
    ) -> ReferenceStatistics:
        """Reads a statistics file: ours, pytorch-fid's ``--save-stats`` or EDM's.

        Args:
          path: The ``.npz`` (local or a bucket URL).
          expected_sha256: Optional SHA-256 to check first.

        Raises:
          FileNotFoundError: If the file does not exist.
          KeyError: If it lacks ``mu`` or ``sigma``.
          ValueError: If it was written by a newer format version.
          ChecksumMismatchError: On a checksum mismatch or a corrupt file.
        """
        arrays = load_arrays(path, expected_sha256=expected_sha256, what="statistics file")
        missing = {"mu", "sigma"} - set(arrays)
        if missing:
            raise KeyError(
                f"statistics file {os.fspath(path)!r} lacks {sorted(missing)}; it holds "
                f"{sorted(arrays)} (expected arrays 'mu' [D] and 'sigma' [D, D])"
            )
        version = int(arrays.get("version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"statistics file {os.fspath(path)!r} has format version {version}; this "
                f"jaxdiff reads up to {FORMAT_VERSION}: upgrade jaxdiff or re-create the file"
            )
        strings = {k: str(arrays[k]) for k in _STRING_KEYS if k in arrays}
        return cls(
            arrays["mu"],
            arrays["sigma"],
            num=int(arrays.get("num", 0)),
            image_shape=tuple(np.asarray(arrays.get("image_shape", ())).reshape(-1)),
            version=version,
            **strings,
        )

    def check_compatible(
        self, feature: str, dim: int | None = None, *, path: Any = None, hint: str = ""
    ) -> None:
        """Raises unless these statistics can be compared with ``feature`` features.

        Files that do not name their feature space (pytorch-fid, EDM) are trusted on the
        name; their dimension is still checked when ``dim`` is given.

        Args:
          feature: The evaluator's feature space name.
          dim: Its feature dimension, or None to skip that check.
          path: The file, for the message.
          hint: How to make the right statistics, for the message.

        Raises:
          ValueError: Naming both feature spaces (or sizes), the file and the fix.
        """
        where = f" {os.fspath(path)!r}" if path is not None else ""
        fix = hint or "use statistics made for this evaluator"
        if self.feature and self.feature != feature:
            raise ValueError(
                f"reference statistics{where} are of {self.feature!r} features (evaluator "
                f"{self.evaluator or '?'}, data {self.source or '?'}), but this evaluator "
                f"compares {feature!r} features: {fix}"
            )
        if dim is not None and self.mu.shape[0] != dim:
            raise ValueError(
                f"reference statistics{where} have {self.mu.shape[0]}-d features, but "
                f"{feature!r} features are {dim}-d: {fix}"
            )


def save_statistics(
    path: str | os.PathLike, mu: ArrayLike, sigma: ArrayLike, **metadata: Any
) -> str:
    """Writes ``mu`` and ``sigma`` (plus optional metadata) in the statistics format.

    Args:
      path: Output file, local or a bucket URL (written as given, deterministic bytes).
      mu: ``[D]`` mean.
      sigma: ``[D, D]`` covariance.
      **metadata: Optional :class:`ReferenceStatistics` fields (``num=``, ``evaluator=``,
        ``feature=``, ``image_shape=``, ``source=``).

    Returns:
      The SHA-256 of the written file.
    """
    return ReferenceStatistics(mu, sigma, **metadata).save(path)


def load_statistics(
    path: str | os.PathLike, *, expected_sha256: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``(mu, sigma)`` from a statistics file (:meth:`ReferenceStatistics.load`).

    Args:
      path: The file (ours, pytorch-fid's ``--save-stats`` output or EDM's ``.npz``).
      expected_sha256: Optional SHA-256 to check first.

    Returns:
      ``(mu [D], sigma [D, D])`` as float64.
    """
    stats = ReferenceStatistics.load(path, expected_sha256=expected_sha256)
    return stats.mu, stats.sigma
