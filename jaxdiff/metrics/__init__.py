"""Evaluation metrics: Frechet distances, FID Inception, FD-digits, PRDC, exact toy metrics.

Entry points: :func:`evaluate_samples` (metrics of host samples by evaluator name),
:func:`make_sample_and_evaluate_fn` (sharded sampling + features + metrics from any
``generate(params, labels, keys)`` callable) and :func:`reference_statistics` (reference
``mu``/``sigma`` streamed from a data source; command: ``python -m
jaxdiff.metrics.reference_stats``). Metrics never build models or samplers:
:func:`jaxdiff.experiment.sample_and_evaluate` does that for a trained run. See
``docs/evaluation.md``.
"""

from jaxdiff.metrics.adm_batches import AdmBatch, load_adm_reference, save_adm_reference
from jaxdiff.metrics.classifier import (
    CLASSIFIER_PATH,
    CLASSIFIER_SHA256,
    DigitsClassifier,
    load_classifier,
)
from jaxdiff.metrics.diffusion_classifier import (
    DiffusionClassifier,
    classify,
    evaluation_levels,
)
from jaxdiff.metrics.dinov2 import DINOv2ViT, dinov2_features, load_dinov2_params
from jaxdiff.metrics.evaluate import (
    EVALUATORS,
    SampleEvalResult,
    evaluate_samples,
    get_evaluator,
    get_evaluators,
    make_sample_and_evaluate_fn,
)
from jaxdiff.metrics.evaluator import Evaluator, FeatureAccumulator, combine, feature_moments
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
from jaxdiff.metrics.inception_eval import (
    INCEPTION_FC_ENV,
    INCEPTION_FEATURE,
    INCEPTION_METRICS,
    inception_evaluator,
)
from jaxdiff.metrics.inception_heads import (
    inception_logits,
    inception_outputs,
    load_inception_fc,
    save_inception_fc,
)
from jaxdiff.metrics.prdc import density_coverage, prdc, precision_recall
from jaxdiff.metrics.scores import adm_spatial_features, inception_score, kid, mmd2_unbiased
from jaxdiff.metrics.statistics import FORMAT_VERSION, ReferenceStatistics, RunningStatistics
from jaxdiff.metrics.streaming import (
    feature_evaluator,
    reference_statistics,
    save_reference_statistics,
)
from jaxdiff.metrics.toy import mmd, negative_log_likelihood, sliced_wasserstein
from jaxdiff.metrics.weights import ChecksumMismatchError

__all__ = [
    "DiffusionClassifier",
    "classify",
    "evaluation_levels",
    "inception_logits",
    "inception_outputs",
    "load_inception_fc",
    "save_inception_fc",
    "CLASSIFIER_PATH",
    "CLASSIFIER_SHA256",
    "EVALUATORS",
    "INCEPTION_FC_ENV",
    "INCEPTION_METRICS",
    "FeatureAccumulator",
    "combine",
    "feature_moments",
    "get_evaluators",
    "inception_evaluator",
    "FORMAT_VERSION",
    "INCEPTION_FEATURE",
    "INCEPTION_SHA256",
    "INCEPTION_WEIGHTS_ENV",
    "AdmBatch",
    "ChecksumMismatchError",
    "DINOv2ViT",
    "DigitsClassifier",
    "Evaluator",
    "InceptionV3",
    "InceptionWeightsNotFoundError",
    "ReferenceStatistics",
    "RunningStatistics",
    "SampleEvalResult",
    "adm_spatial_features",
    "class_accuracy",
    "density_coverage",
    "dinov2_features",
    "evaluate_samples",
    "fd_digits",
    "feature_evaluator",
    "feature_statistics",
    "frechet_distance",
    "get_evaluator",
    "inception_features",
    "inception_score",
    "kid",
    "load_adm_reference",
    "load_classifier",
    "load_dinov2_params",
    "load_inception_variables",
    "load_statistics",
    "make_sample_and_evaluate_fn",
    "mmd",
    "mmd2_unbiased",
    "negative_log_likelihood",
    "prdc",
    "precision_recall",
    "reference_statistics",
    "save_adm_reference",
    "save_reference_statistics",
    "save_statistics",
    "sliced_wasserstein",
]
