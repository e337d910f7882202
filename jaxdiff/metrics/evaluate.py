"""Evaluators by name, and sharded sample-then-evaluate: the metrics' two entry points.

An :class:`Evaluator` splits a metric in two:

* ``feature_fn(feature_params, samples) -> {name: [B, ...]}``: pure, jittable, per
  sample, so it runs on the devices next to the sampler, sharded over the batch;
* ``reduce_fn(features, labels) -> {metric: float}``: float64 numpy on the host over
  all N samples (Frechet distance, k-NN manifolds, MMD...).

Evaluators (:func:`get_evaluator`):

=============  ===============================================================  ========
name           metrics                                                          needs
=============  ===============================================================  ========
``fd_digits``  ``fd_digits``, ``precision``, ``recall``, ``density``,           nothing
               ``coverage``, ``class_accuracy`` (with labels)                   (shipped)
``fid``        ``fid`` (Inception pool3 vs reference ``mu``/``sigma``)          weights +
                                                                                 stats file
``sfid``       ``sfid`` (ADM's spatial features)                                weights +
                                                                                 ADM batch
``is``         ``inception_score`` (ADM's splits of 5000)                       weights +
                                                                                 logits
``prec_recall`` ``precision``, ``recall`` (k = 3, vs the reference images)      weights +
                                                                                 ADM batch
``kid``        ``kid``, ``kid_std``                                             weights +
                                                                                 ADM batch
``fd_dinov2``  ``fd_dinov2`` (DINOv2 CLS features, EDM2's preprocessing)        weights +
                                                                                 stats file
``toy``        ``nll`` (exact), ``support_fraction`` (checkerboard), ``swd``,   dataset
               ``mmd`` vs the toy's ``"test"`` split                            name
=============  ===============================================================  ========

The five Inception metrics share one network pass (:mod:`jaxdiff.metrics.inception_eval`);
:func:`get_evaluators` builds any list of names as one evaluator, e.g. the ADM table
``["fid", "sfid", "is", "prec_recall"]``.

Entry points (metrics take samples, or a ``generate(params, labels, keys)`` callable;
they never build a model or a sampler themselves):

* :func:`evaluate_samples` ``(name, samples, labels=None, **kwargs)``: metrics of samples
  already on the host (e.g. the ``.npz`` from ``python -m sample``).
* :func:`make_sample_and_evaluate_fn` ``(generate, evaluator, mesh=..., num=...)``:
  compiles sampling plus the evaluator's features into one sharded, jitted call per
  batch, once, for repeated evaluation (in-loop, or
  :func:`jaxdiff.experiment.sample_and_evaluate` for a trained run). Sample ``j`` is
  seeded by ``fold_in(key(seed), j)``, so results do not depend on device count or
  batch size.

Reference statistics of real data are streamed from a data source by
:func:`jaxdiff.metrics.streaming.reference_statistics`; those of generated samples come
from ``evaluator.statistics(result.features)``. Both give a
:class:`~jaxdiff.metrics.statistics.ReferenceStatistics`, one file format.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.typing import ArrayLike

from jaxdiff.data import get_dataset
from jaxdiff.metrics import fd_digits as fdd
from jaxdiff.metrics import toy
from jaxdiff.metrics.classifier import DigitsClassifier, load_classifier
from jaxdiff.metrics.evaluator import Evaluator, Features, combine
from jaxdiff.metrics.fd_dinov2 import fd_dinov2_evaluator
from jaxdiff.metrics.inception_eval import (
    INCEPTION_METRICS,
    fid_evaluator,
    inception_evaluator,
)
from jaxdiff.metrics.statistics import ReferenceStatistics
from jaxdiff.parallel import is_main_process, make_sharded_generate

EVALUATORS = ("fd_digits", "fid", "sfid", "is", "prec_recall", "kid", "fd_dinov2", "toy")
"""Names accepted by :func:`get_evaluator` and :func:`get_evaluators`."""

_MAKE_STATS = "python -m jaxdiff.metrics.reference_stats --dataset=NAME --evaluator={} --out=FILE"


@functools.lru_cache(maxsize=4)
def _classifier_feature_fn(clf: DigitsClassifier) -> Callable:
    def feature_fn(params, x):
        feats, logits = fdd.outputs_fn(clf, params, x)
        return {"features": feats, "logits": logits}

    return feature_fn


def fd_digits_evaluator(
    classifier: DigitsClassifier | str | os.PathLike | None = None,
    *,
    reference_split: str = fdd.REFERENCE_SPLIT,
    reference_stats: str | os.PathLike | None = None,
    k_pr: int = 3,
    k_dc: int = 5,
) -> Evaluator:
    """FD-digits, precision/recall (k=3), density/coverage (k=5), class accuracy.

    Args:
      classifier: A loaded classifier, a classifier file, or None for the shipped one.
      reference_split: Digits split of the reference features (precision, recall,
        density, coverage; and FD-digits unless ``reference_stats`` is given).
      reference_stats: Optional statistics file of the same classifier's features (e.g.
        from ``python -m jaxdiff.metrics.reference_stats --evaluator=fd_digits``) to
        compute FD-digits against instead of the split.
      k_pr: k of precision/recall.
      k_dc: k of density/coverage.

    Raises:
      ValueError: If ``reference_stats`` are of another feature space.
    """
    clf = classifier if isinstance(classifier, DigitsClassifier) else load_classifier(classifier)
    feature_fn = _classifier_feature_fn(clf)
    ref_stats = None
    if reference_stats is not None:
        stats = ReferenceStatistics.load(reference_stats)
        hint = "make them with " + _MAKE_STATS.format("fd_digits")
        stats.check_compatible(
            clf.feature_name, clf.model.feature_dim, path=reference_stats, hint=hint
        )
        ref_stats = (stats.mu, stats.sigma)

    def reduce_fn(f, labels):
        return fdd.fd_digits_metrics(
            f["features"],
            f["logits"],
            labels,
            reference_split=reference_split,
            classifier=clf,
            k_pr=k_pr,
            k_dc=k_dc,
            reference_stats=ref_stats,
        )

    return Evaluator("fd_digits", clf.params, feature_fn, reduce_fn, feature_name=clf.feature_name)


def toy_evaluator(
    dataset: str,
    *,
    reference_split: str = "test",
    num_reference: int | None = None,
    num_projections: int = 256,
    seed: int = 0,
    bandwidth: float = 0.5,
) -> Evaluator:
    """Exact NLL, sliced Wasserstein-2 and MMD^2 of 2-D toy samples.

    Args:
      dataset: ``"toy_gmm"`` (``"gmm"``), ``"moons"`` or ``"checkerboard"``.
      reference_split: Toy split used as the reference set for SWD and MMD (the
        ``"test"`` split: 10,000 fixed points).
      num_reference: Use only the first this many reference points (None = all).
      num_projections: SWD directions.
      seed: SWD direction seed.
      bandwidth: MMD kernel width.
    """
    source = get_dataset(dataset, split=reference_split)
    count = len(source) if num_reference is None else min(num_reference, len(source))
    ref = np.asarray(source.get_batch(np.arange(count))["image"], np.float64)
    try:
        log_prob = toy.toy_log_prob(dataset)
    except ValueError:
        log_prob = None

    @functools.cache
    def ref_kernel_mean() -> float:  # the O(M^2) reference term, once per evaluator
        return toy.kernel_mean(ref, bandwidth=bandwidth)

    def reduce_fn(f, labels):
        del labels
        x = f["points"]
        out: dict[str, float] = {}
        if log_prob is not None:
            out["nll"] = toy.negative_log_likelihood(x, log_prob)
            if dataset == "checkerboard":
                out["support_fraction"] = toy.support_fraction(x, log_prob)
        out["swd"] = toy.sliced_wasserstein(x, ref, num_projections=num_projections, seed=seed)
        out["mmd"] = toy.mmd(x, ref, bandwidth=bandwidth, y_kernel_mean=ref_kernel_mean())
        return out

    return Evaluator("toy", None, _identity_points, reduce_fn, batch_size=100_000)


def _identity_points(params: Any, x: jax.Array) -> dict[str, jax.Array]:
    del params
    return {"points": x}


def get_evaluator(name: str, **kwargs: Any) -> Evaluator:
    """Builds an evaluator by name (see the module table for names and kwargs).

    Raises:
      ValueError: For an unknown name, listing the known ones.
    """
    builders = {
        "fd_digits": fd_digits_evaluator,
        "fid": fid_evaluator,
        "fd_dinov2": fd_dinov2_evaluator,
        "toy": toy_evaluator,
    }
    if name in INCEPTION_METRICS and name != "fid":
        return inception_evaluator((name,), **kwargs)
    if name not in builders:
        raise ValueError(f"unknown evaluator {name!r}: choose one of {list(EVALUATORS)}")
    return builders[name](**kwargs)


def get_evaluators(
    names: str | list[str] | tuple[str, ...],
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Evaluator:
    """Several evaluators by name as one (one feature pass; see :func:`combine`).

    The Inception metrics among ``names`` become one :func:`inception_evaluator`, so
    ``["fid", "sfid", "is", "prec_recall"]`` (ADM's table) runs the network once.

    Args:
      names: Evaluator names (a list, or one comma-separated string), each at most once.
      options: Keyword arguments by evaluator name; ``options["inception"]`` is shared by
        every Inception metric (``inception_weights``, ``inception_fc``, ``ref_batch``,
        ``reference_stats``...), and ``options[name]`` adds to it.

    Raises:
      ValueError: For an unknown or repeated name, or Inception options that disagree.
    """
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    bad = [n for n in names if n not in EVALUATORS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"evaluators must be distinct names from {list(EVALUATORS)}, got {names}")
    options = dict(options or {})
    built, inception = [], [n for n in names if n in INCEPTION_METRICS]
    for name in names:
        if name in INCEPTION_METRICS:
            if name != inception[0]:
                continue  # built with the first Inception metric
            # None means "not given", so a shared default never clashes with a value.
            kwargs = {k: v for k, v in options.get("inception", {}).items() if v is not None}
            for metric in inception:
                for key, value in options.get(metric, {}).items():
                    if value is not None and kwargs.setdefault(key, value) != value:
                        raise ValueError(
                            f"Inception metrics disagree on {key}={value!r} vs "
                            f"{kwargs[key]!r}: pass it once, as options['inception']"
                        )
            built.append(inception_evaluator(tuple(inception), **kwargs))
        else:
            built.append(get_evaluator(name, **options.get(name, {})))
    return combine(built)


def evaluate_samples(
    name: str | Evaluator, samples: ArrayLike, labels: ArrayLike | None = None, **kwargs: Any
) -> dict[str, float]:
    """Metrics of host samples, by evaluator name.

    Args:
      name: ``"fd_digits"``, ``"fid"``, ``"toy"``, or a built :class:`Evaluator`.
      samples: ``[N, ...]`` samples as the sampler returns them (images in [-1, 1],
        or ``[N, 2]`` toy points).
      labels: ``[N]`` conditioning labels (for class accuracy), or None.
      **kwargs: Evaluator options, e.g. ``dataset="toy_gmm"`` for ``"toy"``,
        ``reference_stats=...`` for ``"fid"``.

    Returns:
      Metric name -> float.
    """
    evaluator = name if isinstance(name, Evaluator) else get_evaluator(name, **kwargs)
    return evaluator(samples, labels)


def progress_bar(total: int, show: bool, desc: str, unit: str) -> Any:
    """A tqdm bar on process 0 when ``show``; hidden when stderr is not a terminal."""
    from tqdm.auto import tqdm

    # disable=None hides the bar when stderr is not a terminal (logs, CI, tests).
    visible = show and is_main_process()
    return tqdm(total=total, unit=unit, desc=desc, disable=None if visible else True)


@dataclasses.dataclass
class SampleEvalResult:
    """What a sample-and-evaluate run returns.

    Attributes:
      metrics: Metric name -> float.
      samples: ``[num, ...]`` float32 samples if requested, else None.
      labels: ``[num]`` conditioning labels (None for an unconditional model).
      nfe: Network evaluations per sample.
      features: The evaluator's per-sample outputs (``{name: [num, ...]}``; its
        ``moments`` as running statistics), e.g. for
        ``evaluator.statistics(result.features).save(path)``.
    """

    metrics: dict[str, float]
    samples: np.ndarray | None
    labels: np.ndarray | None
    nfe: int
    features: Features | None = None


def make_sample_and_evaluate_fn(
    generate: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, dict]],
    evaluator: Evaluator,
    *,
    mesh: Mesh,
    num: int,
    labels: ArrayLike | None = None,
    batch_size: int = 256,
    param_shardings: Any = None,
) -> Callable[..., SampleEvalResult]:
    """Compiles sample -> features once; returns ``fn(params, seed, return_samples=False)``.

    Sampling and the evaluator's per-sample features run in one jitted call per global
    batch, sharded over the mesh's ``('data', 'fsdp')`` axes
    (:func:`jaxdiff.parallel.make_sharded_generate`); sample ``j`` is seeded by
    ``fold_in(key(seed), j)``, so results do not depend on device count or batch size.
    Only the host reduction (Frechet distance, k-NN...) runs after all batches.

    Args:
      generate: ``generate(params, labels, keys) -> (samples, aux)``, e.g. from
        :func:`jaxdiff.generate.make_generate_fn`.
      evaluator: The metric (see :func:`get_evaluator`).
      mesh: A mesh with ``('data', 'fsdp', ...)`` axes.
      num: Number of samples.
      labels: ``[num]`` conditioning labels (class accuracy uses them), or None for an
        unconditional model.
      batch_size: Global samples per call.
      param_shardings: Shardings of the model params on ``mesh``; default replicated.

    Returns:
      ``fn(params, seed, return_samples=False, progress=False) -> SampleEvalResult``
      (``return_samples``: True, or the number of first samples to return):
      features reach the evaluator batch by batch (``moments`` as float64 running
      statistics, never all rows); ``progress=True`` shows a bar of samples done
      (process 0, on a terminal).
    """
    if num < 2:
        raise ValueError(f"num must be >= 2 to evaluate, got {num}")
    lab = None if labels is None else np.asarray(labels, np.int32)
    run = make_sharded_generate(
        generate,
        mesh=mesh,
        num=num,
        labels=np.zeros(num, np.int32) if lab is None else lab,
        batch_size=batch_size,
        param_shardings=param_shardings,
        extra_fn=evaluator.feature_fn,
        extra_params=evaluator.feature_params,
    )

    def fn(
        params: Any, seed: int, return_samples: bool | int = False, progress: bool = False
    ) -> SampleEvalResult:
        acc = evaluator.accumulator()
        bar = progress_bar(num, progress, f"sampling for {evaluator.name}", "sample")
        try:
            out = run(
                params, seed, keep_samples=return_samples, on_extras=acc.update,
                progress=lambda done: bar.update(done - bar.n),
            )  # fmt: skip
        finally:
            bar.close()
        features = acc.result()
        metrics = evaluator.reduce_fn(features, lab)
        return SampleEvalResult(metrics, out.samples, lab, out.nfe, features)

    return fn
