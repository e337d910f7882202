"""The :class:`Evaluator`: a metric as a sharded per-sample feature pass plus a host reduction.

Features reach the reduction batch by batch through a :class:`FeatureAccumulator`: outputs
the metric only needs the mean and covariance of (an evaluator's ``moments``, e.g. FID's
pool3 features) are folded into float64 running statistics as they arrive, so 50 000 x
2048 features never sit in memory; the others are concatenated. :func:`combine` runs
several evaluators as one feature pass. Builders by name are in
:mod:`jaxdiff.metrics.evaluate`.
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

from jaxdiff.metrics.statistics import ReferenceStatistics, RunningStatistics

Features = dict[str, Any]
"""Per-sample outputs of a feature function, by name: ``{name: [N, ...]}``; what a reduction
receives holds a :class:`~jaxdiff.metrics.statistics.RunningStatistics` for each of the
evaluator's ``moments`` instead."""


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
      moments: Outputs ``reduce_fn`` uses only through their mean and covariance: it
        receives them as :class:`~jaxdiff.metrics.statistics.RunningStatistics`
        accumulated in float64 batch by batch (see :func:`feature_moments`).
    """

    name: str
    feature_params: Any
    feature_fn: Callable[[Any, jax.Array], dict[str, jax.Array]]
    reduce_fn: Callable[[Features, np.ndarray | None], dict[str, float]]
    batch_size: int = 500
    feature_name: str = ""
    moments: tuple[str, ...] = ()

    def accumulator(self, keep: bool = False) -> FeatureAccumulator:
        """A fresh :class:`FeatureAccumulator` for this evaluator's outputs.

        Args:
          keep: Also keep every row of the ``moments`` outputs (e.g. to save them).
        """
        return FeatureAccumulator(self.moments, keep=keep)

    def _batches(self, samples: ArrayLike):
        fn = _jitted(self.feature_fn)
        samples = np.asarray(samples, np.float32)
        for i in range(0, len(samples), self.batch_size):
            batch = jnp.asarray(samples[i : i + self.batch_size])
            yield {k: np.asarray(v) for k, v in fn(self.feature_params, batch).items()}

    def features(self, samples: ArrayLike) -> dict[str, np.ndarray]:
        """Every row of ``feature_fn`` over host samples, computed in batches (one device)."""
        chunks = list(self._batches(samples))
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def __call__(self, samples: ArrayLike, labels: ArrayLike | None = None) -> dict[str, float]:
        """Metrics of host ``samples`` (with optional conditioning ``labels``)."""
        if len(samples) < 2:
            raise ValueError(f"need at least 2 samples to evaluate, got {len(samples)}")
        lab = None if labels is None else np.asarray(labels)
        acc = self.accumulator()
        for batch in self._batches(samples):
            acc.update(batch)
        return self.reduce_fn(acc.result(), lab)

    def statistics(
        self, features: Features, *, key: str = "features", **metadata: Any
    ) -> ReferenceStatistics:
        """Statistics of host features in the reference-statistics format.

        E.g. of generated samples: ``ev.statistics(fn(params, seed).features).save(path)``
        with ``fn`` from :func:`.evaluate.make_sample_and_evaluate_fn`.

        Args:
          features: ``{name: [N, ...]}`` as :meth:`features` returns them, or as a
            ``SampleEvalResult`` holds them (where ``moments`` are running statistics).
          key: Which output to describe.
          **metadata: Other fields, e.g. ``source="run X, seed 0"``, ``image_shape=``.

        Raises:
          ValueError: If ``key`` is not among the features.
        """
        if key not in features:
            raise ValueError(f"no {key!r} among the features {sorted(features)}: pass key=")
        meta = {"evaluator": self.name, "feature": self.feature_name, **metadata}
        if isinstance(features[key], RunningStatistics):
            return ReferenceStatistics.from_running(features[key], **meta)
        return ReferenceStatistics.from_features(features[key], **meta)


class FeatureAccumulator:
    """Collects an evaluator's per-sample outputs batch by batch, on the host.

    Outputs named in ``moments`` are folded into float64
    :class:`~jaxdiff.metrics.statistics.RunningStatistics` (exact mean and covariance for
    any batch split) and their rows dropped; the others are kept and concatenated.

    Args:
      moments: Output names reduced to running statistics.
      keep: Keep the rows of ``moments`` outputs too (under ``"<name>/rows"``).
    """

    def __init__(self, moments: tuple[str, ...] = (), keep: bool = False) -> None:
        self._moments = {name: RunningStatistics() for name in moments}
        self._keep = keep
        self._rows: dict[str, list[np.ndarray]] = {}
        self.num = 0

    def update(self, batch: dict[str, ArrayLike]) -> None:
        """Adds one batch ``{name: [B, ...]}`` of outputs (every name, every batch)."""
        sizes = {len(v) for v in batch.values()}
        if len(sizes) > 1:
            raise ValueError(f"outputs of one batch differ in length: {sorted(sizes)}")
        for name, value in batch.items():
            if name in self._moments:
                self._moments[name].update(value)
                if not self._keep:
                    continue
                name = f"{name}/rows"
            self._rows.setdefault(name, []).append(np.asarray(value))
        self.num += sizes.pop() if sizes else 0

    def result(self) -> Features:
        """``{name: RunningStatistics}`` for ``moments``, ``{name: [N, ...]}`` for the rest."""
        out: Features = {k: np.concatenate(v) for k, v in self._rows.items()}
        out.update(self._moments)
        return out


def feature_moments(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [D], covariance [D, D])`` in float64 of rows or of running statistics.

    A reduction calls this on a ``moments`` output (a
    :class:`~jaxdiff.metrics.statistics.RunningStatistics`), or on ``[N, D]`` rows
    (``numpy.cov`` with the ``N - 1`` denominator), so it works either way.
    """
    if isinstance(features, RunningStatistics):
        return features.mean(), features.covariance()
    x = np.asarray(features, np.float64)
    x = x.reshape(x.shape[0], -1)
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def combine(evaluators: list[Evaluator] | tuple[Evaluator, ...]) -> Evaluator:
    """Several evaluators as one: one feature pass (one jitted call), metrics merged.

    The combined ``feature_fn`` runs each evaluator's on the same samples and names its
    outputs ``"<i>/<name>"``; the reduction hands each evaluator its own outputs back.
    Used by ``python -m sample --eval=fid,fd_dinov2`` so that the samples are drawn once
    and every network runs next to the sampler.

    Args:
      evaluators: Evaluators whose metric names do not clash.

    Returns:
      One evaluator (itself if given one), named ``"a+b"``.

    Raises:
      ValueError: For no evaluators.
    """
    evaluators = tuple(evaluators)
    if not evaluators:
        raise ValueError("combine() needs at least one evaluator")
    if len(evaluators) == 1:
        return evaluators[0]
    fns = tuple(e.feature_fn for e in evaluators)

    def feature_fn(params, x):
        out = {}
        for i, (fn, p) in enumerate(zip(fns, params, strict=True)):
            out.update({f"{i}/{k}": v for k, v in fn(p, x).items()})
        return out

    def reduce_fn(features, labels):
        metrics: dict[str, float] = {}
        for i, ev in enumerate(evaluators):
            prefix = f"{i}/"
            own = {k[len(prefix) :]: v for k, v in features.items() if k.startswith(prefix)}
            for name, value in ev.reduce_fn(own, labels).items():
                if name in metrics:
                    raise ValueError(f"two evaluators report {name!r}: combine others")
                metrics[name] = value
        return metrics

    moments = tuple(f"{i}/{m}" for i, e in enumerate(evaluators) for m in e.moments)
    return Evaluator(
        "+".join(e.name for e in evaluators),
        tuple(e.feature_params for e in evaluators),
        feature_fn,
        reduce_fn,
        min(e.batch_size for e in evaluators),
        evaluators[0].feature_name,
        moments,
    )


@functools.lru_cache(maxsize=16)
def _jitted(fn: Callable) -> Callable:
    return jax.jit(fn)
