"""Evaluation metrics: Frechet distances, FID Inception, FD-digits, PRDC, exact toy metrics.

Entry points: :func:`evaluate_samples` (metrics of host samples by evaluator name) and
:func:`make_sample_and_evaluate_fn` (sharded sampling + features + metrics from any
``generate(params, labels, keys)`` callable). Metrics never build models or samplers:
:func:`jaxdiff.experiment.sample_and_evaluate` does that for a trained run. See
``docs/evaluation.md``.
"""

from jaxdiff.metrics.classifier import (
    CLASSIFIER_PATH,
    CLASSIFIER_SHA256,
    DigitsClassifier,
    load_classifier,
)
from jaxdiff.metrics.evaluate import (
    EVALUATORS,
    Evaluator,
    SampleEvalResult,
    evaluate_samples,
    get_evaluator,
    make_sample_and_evaluate_fn,
    save_reference_statistics,
)
from jaxdiff.metrics.fd_digits import class_accuracy, fd_digits
from jaxdiff.metrics.frechet import (
    feature_statistics,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from jaxdiff.metrics.inception import (
    INCEPTION_SHA256,
    INCEPTION_WEIGHTS_ENV,
    InceptionV3,
    InceptionWeightsNotFoundError,
    inception_features,
    load_inception_variables,
)
from jaxdiff.metrics.prdc import density_coverage, prdc, precision_recall
from jaxdiff.metrics.toy import mmd, negative_log_likelihood, sliced_wasserstein
from jaxdiff.metrics.weights import ChecksumMismatchError

__all__ = [
    "CLASSIFIER_PATH",
    "CLASSIFIER_SHA256",
    "EVALUATORS",
    "INCEPTION_SHA256",
    "INCEPTION_WEIGHTS_ENV",
    "ChecksumMismatchError",
    "DigitsClassifier",
    "Evaluator",
    "InceptionV3",
    "InceptionWeightsNotFoundError",
    "SampleEvalResult",
    "class_accuracy",
    "density_coverage",
    "evaluate_samples",
    "fd_digits",
    "feature_statistics",
    "frechet_distance",
    "get_evaluator",
    "inception_features",
    "load_classifier",
    "load_inception_variables",
    "load_statistics",
    "make_sample_and_evaluate_fn",
    "mmd",
    "negative_log_likelihood",
    "prdc",
    "precision_recall",
    "save_reference_statistics",
    "save_statistics",
    "sliced_wasserstein",
]
