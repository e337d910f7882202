"""FD-digits: Frechet distance in the digits classifier's feature space, plus class accuracy.

**FD-digits is not FID.** It is the Frechet distance (:func:`frechet_distance`) between
Gaussians fitted to the 128-d penultimate features of jaxdiff's shipped digits classifier
(:mod:`jaxdiff.metrics.classifier`, 99.3% held-out accuracy) for generated 8x8 digits
and for the reference digits. Its scale is unrelated to FID's; compare FD-digits only
with FD-digits computed by the same classifier file (its SHA-256 is pinned).

* **Reference set: the digits ``"train"`` split** (1,500 images). That is the data the
  generators and the classifier were trained on, and it keeps the ``"test"`` split
  (297 images) held out, so ``FD(test, train)`` is an honest "real data" floor for the
  metric (a model can beat it only by copying the training set).
* **Class accuracy**: the fraction of class-conditional samples that the classifier
  assigns to their conditioning label.
* Precision/recall/density/coverage of the samples against the same reference
  features are in :mod:`jaxdiff.metrics.prdc`; :func:`fd_digits_metrics` returns all.

Like FID, FD-digits is biased upwards for small sample counts; compare values at equal
N (2,000 is the documented default).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.data import load_digits
from jaxdiff.metrics.classifier import DigitsClassifier, load_classifier
from jaxdiff.metrics.frechet import feature_statistics, frechet_distance
from jaxdiff.metrics.prdc import prdc

REFERENCE_SPLIT = "train"
"""Digits split whose classifier features are the FD-digits reference."""


def classifier_outputs(
    images: Any, classifier: DigitsClassifier | None = None, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and logits of digit images, on the host, in batches.

    Args:
      images: ``[N, 8, 8, 1]`` images in [-1, 1].
      classifier: Default: the shipped classifier.
      batch_size: Images per forward pass.

    Returns:
      ``(features [N, F] float32, logits [N, 10] float32)``.
    """
    clf = load_classifier() if classifier is None else classifier
    fn = _jitted_outputs(clf)
    feats, logits = [], []
    images = np.asarray(images, np.float32)
    for start in range(0, len(images), batch_size):
        f, lg = fn(clf.params, jnp.asarray(images[start : start + batch_size]))
        feats.append(np.asarray(f))
        logits.append(np.asarray(lg))
    return np.concatenate(feats), np.concatenate(logits)


@functools.lru_cache(maxsize=4)
def _jitted_outputs(clf: DigitsClassifier):
    return jax.jit(lambda params, x: outputs_fn(clf, params, x))


def outputs_fn(clf: DigitsClassifier, params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pure ``(features, logits)`` of a batch (for use inside a sharded jit)."""
    feats = clf.model.apply({"params": params}, x, method=type(clf.model).features)
    logits = clf.model.apply({"params": params}, x)
    return feats, logits


@functools.lru_cache(maxsize=8)
def reference_features(
    split: str = REFERENCE_SPLIT, classifier: DigitsClassifier | None = None
) -> np.ndarray:
    """Classifier features of a real digits split (cached; read-only array)."""
    images, _ = load_digits(split)
    feats, _ = classifier_outputs(images, classifier)
    feats.flags.writeable = False
    return feats


@functools.lru_cache(maxsize=8)
def reference_statistics(
    split: str = REFERENCE_SPLIT, classifier: DigitsClassifier | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a real digits split's classifier features (cached, float64)."""
    return feature_statistics(reference_features(split, classifier))


def fd_digits(
    images: Any,
    *,
    reference_split: str = REFERENCE_SPLIT,
    classifier: DigitsClassifier | None = None,
) -> float:
    """FD-digits of images against the reference split.

    Args:
      images: ``[N, 8, 8, 1]`` images in [-1, 1], N >= 2.
      reference_split: Digits split of the reference statistics.
      classifier: Default: the shipped classifier.

    Returns:
      The Frechet distance in classifier-feature space.
    """
    clf = load_classifier() if classifier is None else classifier
    feats, _ = classifier_outputs(images, clf)
    return frechet_distance(*feature_statistics(feats), *reference_statistics(reference_split, clf))


def class_accuracy(images: Any, labels: Any, classifier: DigitsClassifier | None = None) -> float:
    """Fraction of (class-conditional) images classified as their label."""
    _, logits = classifier_outputs(images, classifier)
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def fd_digits_metrics(
    features: np.ndarray,
    logits: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    reference_split: str = REFERENCE_SPLIT,
    classifier: DigitsClassifier | None = None,
    k_pr: int = 3,
    k_dc: int = 5,
    reference_stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """All FD-digits evaluator metrics from precomputed classifier outputs.

    Args:
      features: ``[N, F]`` classifier features of the samples.
      logits: ``[N, 10]`` logits (needed for class accuracy).
      labels: ``[N]`` conditioning labels; class accuracy is reported when given
        (labels equal to 10, the null class, are left out of it).
      reference_split: Digits split of the reference.
      classifier: The classifier that produced ``features``; default the shipped one.
      k_pr: k of precision/recall.
      k_dc: k of density/coverage.
      reference_stats: ``(mu, sigma)`` to compute FD-digits against instead of those of
        ``reference_split`` (e.g. from a statistics file); the k-NN metrics still use
        the split's features.

    Returns:
      ``fd_digits``, ``precision``, ``recall``, ``density``, ``coverage`` and, with
      labels and logits, ``class_accuracy``.
    """
    clf = load_classifier() if classifier is None else classifier
    ref = reference_features(reference_split, clf)
    if reference_stats is None:
        reference_stats = reference_statistics(reference_split, clf)
    out = {
        "fd_digits": frechet_distance(*feature_statistics(features), *reference_stats),
        **prdc(ref, features, k_pr=k_pr, k_dc=k_dc),
    }
    if labels is not None and logits is not None:
        labels = np.asarray(labels)
        keep = labels < logits.shape[-1]
        if keep.any():
            preds = np.argmax(logits[keep], axis=-1)
            out["class_accuracy"] = float(np.mean(preds == labels[keep]))
    return out
