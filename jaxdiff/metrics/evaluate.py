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
``toy``        ``nll`` (exact), ``support_fraction`` (checkerboard), ``swd``,   dataset
               ``mmd`` vs the toy's ``"test"`` split                            name
=============  ===============================================================  ========

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
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.typing import ArrayLike

from jaxdiff.data import get_dataset
from jaxdiff.metrics import fd_digits as fdd
from jaxdiff.metrics import toy
from jaxdiff.metrics.classifier import DigitsClassifier, load_classifier
from jaxdiff.metrics.frechet import feature_statistics, frechet_distance, load_statistics
from jaxdiff.metrics.inception import inception_features, load_inception_variables
from jaxdiff.parallel import make_sharded_generate

Features = dict[str, np.ndarray]
EVALUATORS = ("fd_digits", "fid", "toy")
"""Names accepted by :func:`get_evaluator`."""


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluator:
    """A metric as a sharded per-sample feature pass plus a host reduction.

    Attributes:
      name: Evaluator name.
      feature_params: Params of ``feature_fn`` (a pytree; None if it has none).
      feature_fn: ``(feature_params, samples [B, ...]) -> {name: [B, ...]}``, pure.
      reduce_fn: ``(features {name: [N, ...]}, labels [N] or None) -> {metric: float}``.
      batch_size: Samples per feature batch in :meth:`features`.
    """

    name: str
    feature_params: Any
    feature_fn: Callable[[Any, jax.Array], dict[str, jax.Array]]
    reduce_fn: Callable[[Features, np.ndarray | None], dict[str, float]]
    batch_size: int = 500

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


@functools.lru_cache(maxsize=16)
def _jitted(fn: Callable) -> Callable:
    return jax.jit(fn)


@functools.lru_cache(maxsize=4)
def _inception_feature_fn(input_range: str, quantize: bool) -> Callable:
    def feature_fn(variables, x):
        return {
            "features": inception_features(variables, x, input_range=input_range, quantize=quantize)
        }

    return feature_fn


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
    k_pr: int = 3,
    k_dc: int = 5,
) -> Evaluator:
    """FD-digits, precision/recall (k=3), density/coverage (k=5), class accuracy.

    Args:
      classifier: A loaded classifier, a classifier file, or None for the shipped one.
      reference_split: Digits split of the reference features.
      k_pr: k of precision/recall.
      k_dc: k of density/coverage.
    """
    clf = classifier if isinstance(classifier, DigitsClassifier) else load_classifier(classifier)
    feature_fn = _classifier_feature_fn(clf)

    def reduce_fn(f, labels):
        return fdd.fd_digits_metrics(
            f["features"],
            f["logits"],
            labels,
            reference_split=reference_split,
            classifier=clf,
            k_pr=k_pr,
            k_dc=k_dc,
        )

    return Evaluator("fd_digits", clf.params, feature_fn, reduce_fn)


def fid_evaluator(
    *,
    reference_stats: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    expected_sha256: Any = None,
    input_range: str = "minus_one_one",
    quantize: bool = True,
    batch_size: int = 50,
) -> Evaluator:
    """FID against reference statistics, with the FID Inception network.

    Args:
      reference_stats: ``.npz`` with ``mu``/``sigma`` of the reference set's pool3
        features (pytorch-fid/EDM layout, or :func:`save_reference_statistics`).
      inception_weights: Converted weights; None reads ``$JAXDIFF_INCEPTION_WEIGHTS``.
      expected_sha256: Passed to :func:`load_inception_variables` (None = its default).
      input_range: ``"minus_one_one"`` (jaxdiff samples) or ``"uint8"``.
      quantize: Quantise [-1, 1] samples to 8 bits first (as saved images are).
      batch_size: Images per Inception batch on the host path.

    Raises:
      InceptionWeightsNotFoundError: Without weights, saying how to make them.
      ValueError: Without ``reference_stats``, saying how to make them.
    """
    kw = {} if expected_sha256 is None else {"expected_sha256": expected_sha256}
    variables = load_inception_variables(inception_weights, **kw)
    if reference_stats is None:
        raise ValueError(
            "FID needs reference statistics: pass reference_stats=<.npz with 'mu' and "
            "'sigma'> (pytorch-fid `--save-stats` / EDM reference files work), or make one "
            "with jaxdiff.metrics.evaluate.save_reference_statistics('fid', real_images, path)"
        )
    mu_ref, sigma_ref = load_statistics(reference_stats)

    def reduce_fn(f, labels):
        del labels
        return {"fid": frechet_distance(*feature_statistics(f["features"]), mu_ref, sigma_ref)}

    feature_fn = _inception_feature_fn(input_range, quantize)
    return Evaluator("fid", variables, feature_fn, reduce_fn, batch_size)


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
    builders = {"fd_digits": fd_digits_evaluator, "fid": fid_evaluator, "toy": toy_evaluator}
    if name not in builders:
        raise ValueError(f"unknown evaluator {name!r}: choose one of {list(EVALUATORS)}")
    return builders[name](**kwargs)


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


def save_reference_statistics(
    name: str | Evaluator, samples: ArrayLike, path: str | os.PathLike, **kwargs: Any
) -> str:
    """Writes ``mu``/``sigma`` of an evaluator's ``"features"`` of real data.

    Use it to make FID reference statistics for a dataset: for ``"fid"`` only the
    Inception weights are needed (``inception_weights=`` or
    ``$JAXDIFF_INCEPTION_WEIGHTS``); other kwargs go to :func:`inception_features`.

    Args:
      name: ``"fid"``, ``"fd_digits"`` or an :class:`Evaluator` with a ``"features"`` output.
      samples: ``[N, ...]`` real images (same range convention as generated samples).
      path: Output ``.npz`` (``mu``, ``sigma``).
      **kwargs: Evaluator options.

    Returns:
      The SHA-256 of the written file.
    """
    from jaxdiff.metrics.frechet import save_statistics

    if isinstance(name, Evaluator):
        evaluator = name
    elif name == "fid":
        variables = load_inception_variables(kwargs.pop("inception_weights", None))
        evaluator = Evaluator(
            "fid",
            variables,
            lambda v, x: {"features": inception_features(v, x, **kwargs)},
            lambda f, y: {},
            batch_size=50,
        )
    else:
        evaluator = get_evaluator(name, **kwargs)
    return save_statistics(path, *feature_statistics(evaluator.features(samples)["features"]))


@dataclasses.dataclass
class SampleEvalResult:
    """What a sample-and-evaluate run returns.

    Attributes:
      metrics: Metric name -> float.
      samples: ``[num, ...]`` float32 samples if requested, else None.
      labels: ``[num]`` conditioning labels (None for an unconditional model).
      nfe: Network evaluations per sample.
    """

    metrics: dict[str, float]
    samples: np.ndarray | None
    labels: np.ndarray | None
    nfe: int


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
      ``fn(params, seed, return_samples=False) -> SampleEvalResult``.
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

    def fn(params: Any, seed: int, return_samples: bool = False) -> SampleEvalResult:
        out = run(params, seed, keep_samples=return_samples)
        return SampleEvalResult(evaluator.reduce_fn(out.extras, lab), out.samples, lab, out.nfe)

    return fn
