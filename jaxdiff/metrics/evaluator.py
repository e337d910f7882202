"""The :class:`Evaluator`: a metric as a sharded per-sample feature pass plus a host reduction.

Builders by name (``"fd_digits"``, ``"fid"``, ``"toy"``) are in :mod:`jaxdiff.metrics.evaluate`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff.metrics.statistics import ReferenceStatistics

Features = dict[str, np.ndarray]
"""Per-sample outputs of a feature function, by name: ``{name: [N, ...]}``."""


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluator:
    """A metric as a sharded per-sample feature pass plus a host reduction.

    Attributes:
      name: Evaluator name.
      feature_params: Params of ``feature_fn`` (a pytree; None if it has none).
      feature_fn: ``(feature_params, samples [B, ...]) -> {name: [B, ...]}``, pure.
      reduce_fn: ``(features {name: [N, ...]}, labels [N] or None) -> {metric: float}``.
      batch_size: Samples per feature batch in :meth:`features`.
      feature_name: Name of the space of ``feature_fn``'s ``"features"`` output, stored
        in statistics files so that statistics of another space are refused.
    """

    name: str
    feature_params: Any
    feature_fn: Callable[[Any, jax.Array], dict[str, jax.Array]]
    reduce_fn: Callable[[Features, np.ndarray | None], dict[str, float]]
    batch_size: int = 500
    feature_name: str = ""

    def features(self, samples: ArrayLike) -> Features:
        """Runs ``feature_fn`` over host samples in batches (one device)."""
        fn = _jitted(self.feature_fn)
        samples = np.asarray(samples, np.float32)
        chunks = [
            jax.tree.map(
                np.asarray, fn(self.feature_params, jnp.asarray(samples[i : i + self.batch_size]))
            )
            for i in range(0, len(samples), self.batch_size)
        ]
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def __call__(self, samples: ArrayLike, labels: ArrayLike | None = None) -> dict[str, float]:
        """Metrics of host ``samples`` (with optional conditioning ``labels``)."""
        if len(samples) < 2:
            raise ValueError(f"need at least 2 samples to evaluate, got {len(samples)}")
        lab = None if labels is None else np.asarray(labels)
        return self.reduce_fn(self.features(samples), lab)

    def statistics(
        self, features: Features, *, key: str = "features", **metadata: Any
    ) -> ReferenceStatistics:
        """Statistics of host features in the reference-statistics format.

        E.g. of generated samples: ``ev.statistics(fn(params, seed).features).save(path)``
        with ``fn`` from :func:`make_sample_and_evaluate_fn`.

        Args:
          features: ``{name: [N, ...]}`` as :meth:`features` or ``SampleEvalResult``
            hold them.
          key: Which output to describe.
          **metadata: Other fields, e.g. ``source="run X, seed 0"``, ``image_shape=``.

        Raises:
          ValueError: If ``key`` is not among the features.
        """
        if key not in features:
            raise ValueError(f"no {key!r} among the features {sorted(features)}: pass key=")
        meta = {"evaluator": self.name, "feature": self.feature_name, **metadata}
        return ReferenceStatistics.from_features(features[key], **meta)


@functools.lru_cache(maxsize=16)
def _jitted(fn: Callable) -> Callable:
    return jax.jit(fn)
