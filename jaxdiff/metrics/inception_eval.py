"""The Inception table: FID, sFID, Inception Score, precision/recall and KID in one pass.

One Inception forward per sample gives everything the ADM evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``) prints, and what DiT, SiT, REPA and
the guidance papers report from it:

================  ===================================================  =====================
metric            computed from                                        reference needed
================  ===================================================  =====================
``fid``           pool3 mean/covariance (float64, streamed)            ``reference_stats``
                                                                       or ``ref_batch``
``sfid``          ``mixed_6/conv[..., :7]`` mean/covariance (streamed)  ``ref_batch``
``is``            softmax of the unbiased 1008-way logits, splits of   ``inception_fc``
                  5000 (``inception_score``)                           (no reference)
``precision``,    k = 3 manifolds of pool3 features (Kynkaanniemi et   ``ref_batch`` images
``recall``        al.), samples against the reference batch's images
``kid``,          unbiased polynomial-kernel MMD^2 over subsets        ``ref_batch`` images
``kid_std``
================  ===================================================  =====================

``ref_batch`` is a reference batch in ADM's ``.npz`` layout
(:mod:`jaxdiff.metrics.adm_batches`): a published one (e.g.
``VIRTUAL_imagenet256_labeled.npz``) or one written by ``python -m
jaxdiff.metrics.reference_stats --evaluator=adm``. As in ADM, its stored ``mu``/``sigma``
and ``mu_s``/``sigma_s`` are used when present and are otherwise computed from its images;
precision, recall and KID always use the features of its images. Only pool3 rows are kept
in memory, and only when precision/recall or KID are asked for (ADM keeps them too); the
FID and sFID statistics of the samples are accumulated in float64 batch by batch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxdiff.metrics.adm_batches import AdmBatch, load_adm_reference
from jaxdiff.metrics.evaluator import Evaluator, feature_moments
from jaxdiff.metrics.frechet import frechet_distance
from jaxdiff.metrics.inception import inception_features, load_inception_variables
from jaxdiff.metrics.inception_heads import inception_outputs, load_inception_fc
from jaxdiff.metrics.prdc import precision_recall
from jaxdiff.metrics.scores import (
    ADM_SPLIT_SIZE,
    KID_NUM_SUBSETS,
    KID_SUBSET_SIZE,
    inception_score,
    kid,
)
from jaxdiff.metrics.statistics import ReferenceStatistics

INCEPTION_METRICS = ("fid", "sfid", "is", "prec_recall", "kid")
"""Metric groups of :func:`inception_evaluator`, in the order papers print them."""

INCEPTION_FEATURE = "inception_v3_pool3"
"""Feature-space name of FID statistics (the 2048-d pool3 of the FID Inception)."""
INCEPTION_DIM = 2048

INCEPTION_FC_ENV = "JAXDIFF_INCEPTION_FC"
"""Environment variable naming the converted logits layer (used when none is passed)."""

_MAKE_BATCH = (
    "make one with `python -m jaxdiff.metrics.reference_stats --dataset=NAME --evaluator=adm "
    "--num=10000 --out=ref_batch.npz` (or use a published ADM reference batch)"
)
_MAKE_FID = (
    "make them with `python -m jaxdiff.metrics.reference_stats --dataset=NAME --evaluator=fid "
    "--out=FILE` (or save_reference_statistics('fid', real_images, path)); pytorch-fid "
    "`--save-stats` files, EDM reference files and ADM reference batches work too"
)


@functools.lru_cache(maxsize=8)
def inception_feature_fn(input_range: str, quantize: bool, spatial: bool = False) -> Callable:
    """``(variables, images) -> {"features": pool3 [B, 2048]}`` (+ ``"spatial"``), cached.

    With ``variables = (pool3 variables, fc or None)`` when ``spatial`` or logits are
    needed; logits (``"logits"``: unbiased, as IS uses them) come whenever fc is not None.
    """

    def feature_fn(variables, x):
        # float32 convs at full precision: the features feed distances compared across tools.
        with jax.default_matmul_precision("highest"):
            if not spatial and not isinstance(variables, tuple):
                pool3 = inception_features(variables, x, input_range=input_range, quantize=quantize)
                return {"features": pool3}
            net, fc = variables
            out = inception_outputs(net, x, fc=fc, input_range=input_range, quantize=quantize)
        feats = {"features": out["pool3"]}
        if spatial:
            feats["spatial"] = out["spatial"]
        if fc is not None:
            feats["logits"] = out["logits_unbiased"]
        return feats

    return feature_fn


def _metric_groups(metrics: str | Sequence[str]) -> tuple[str, ...]:
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    bad = [m for m in names if m not in INCEPTION_METRICS]
    if bad or not names:
        raise ValueError(f"unknown Inception metrics {bad or names}: use {list(INCEPTION_METRICS)}")
    return tuple(m for m in INCEPTION_METRICS if m in names)


def _load_fc(path: str | os.PathLike | None) -> dict[str, np.ndarray]:
    path = path or os.environ.get(INCEPTION_FC_ENV)
    if not path:
        raise FileNotFoundError(
            "the Inception Score needs the FID Inception's logits layer: convert it with "
            "`python -m jaxdiff.metrics.convert_inception --pth=pt_inception-2015-12-05-"
            "6726825d.pth --out=fid_inception.npz --fc-out=fid_inception_fc.npz`, then pass "
            f"inception_fc=<that file> (--inception_fc) or set ${INCEPTION_FC_ENV}"
        )
    return load_inception_fc(path)


class _Reference:
    """What the reference side provides, loaded (and its features computed) once, lazily."""

    def __init__(self, groups, reference_stats, ref_batch, variables, batch_size) -> None:
        self.groups, self.variables, self.batch_size = groups, variables, batch_size
        self.fid_stats = None
        if "fid" in groups and reference_stats is not None:
            stats = ReferenceStatistics.load(reference_stats)
            stats.check_compatible(
                INCEPTION_FEATURE, INCEPTION_DIM, path=reference_stats, hint=_MAKE_FID
            )
            self.fid_stats = (stats.mu, stats.sigma)
        needs_batch = [g for g in groups if g in ("sfid", "prec_recall", "kid")]
        if "fid" in groups and self.fid_stats is None:
            needs_batch.insert(0, "fid")
        self.batch: AdmBatch | None = None
        if needs_batch and ref_batch is None:
            what = "reference statistics (reference_stats=) or " if "fid" in needs_batch else ""
            raise ValueError(
                f"{', '.join(needs_batch)} need{'s' if len(needs_batch) == 1 else ''} {what}a "
                f"reference batch in ADM's .npz layout (ref_batch=): {_MAKE_BATCH}"
            )
        if ref_batch is not None and needs_batch:
            self._check_batch(ref_batch, needs_batch)

    def _check_batch(self, path, needs) -> None:
        header = load_adm_reference(path, images=False)
        want_images = any(g in needs for g in ("prec_recall", "kid")) or (
            ("fid" in needs and header.mu is None) or ("sfid" in needs and header.mu_s is None)
        )
        self.batch = load_adm_reference(path, images=True) if want_images else header
        if want_images and self.batch.images is None:
            raise ValueError(
                f"ADM batch {os.fspath(path)!r} holds no images 'arr_0', which "
                f"{', '.join(needs)} need here: {_MAKE_BATCH}"
            )
        mu = self.batch.mu
        if mu is not None and mu.shape[0] != INCEPTION_DIM:
            raise ValueError(
                f"ADM batch {os.fspath(path)!r} has {mu.shape[0]}-d 'mu', but pool3 features "
                f"are {INCEPTION_DIM}-d: it is not an Inception reference batch"
            )

    @functools.cached_property
    def features(self) -> dict[str, np.ndarray]:
        """Pool3 and spatial features of the reference batch's images (computed once)."""
        net = self.variables[0] if isinstance(self.variables, tuple) else self.variables
        fn = inception_feature_fn("uint8", False, spatial=True)
        ev = Evaluator("inception_reference", (net, None), fn, _no_metrics, self.batch_size)
        return ev.features(self.batch.images)

    def stats(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` of ``"pool"`` or ``"spatial"`` features of the reference."""
        if kind == "pool" and self.fid_stats is not None:
            return self.fid_stats
        mu, sigma = (
            (self.batch.mu, self.batch.sigma)
            if kind == "pool"
            else (self.batch.mu_s, self.batch.sigma_s)
        )
        if mu is not None:
            return mu, sigma
        return feature_moments(self.features["features" if kind == "pool" else "spatial"])


def _no_metrics(features, labels):
    raise ValueError("this evaluator only computes reference features")


def inception_evaluator(
    metrics: str | Sequence[str] = ("fid",),
    *,
    reference_stats: str | os.PathLike | None = None,
    ref_batch: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    inception_fc: str | os.PathLike | None = None,
    expected_sha256: Any = None,
    input_range: str = "minus_one_one",
    quantize: bool = True,
    batch_size: int = 50,
    k: int = 3,
    is_split_size: int = ADM_SPLIT_SIZE,
    kid_subsets: int = KID_NUM_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
) -> Evaluator:
    """FID, sFID, IS, precision/recall and/or KID with one Inception pass per sample.

    Args:
      metrics: Any of ``"fid"``, ``"sfid"``, ``"is"``, ``"prec_recall"``, ``"kid"``.
      reference_stats: FID statistics file of the reference set (jaxdiff, pytorch-fid,
        EDM or an ADM batch), local or a bucket URL; FID then uses it.
      ref_batch: A reference batch in ADM's ``.npz`` layout: FID (without
        ``reference_stats``), sFID, precision/recall and KID use it.
      inception_weights: Converted pool3 weights; None reads ``$JAXDIFF_INCEPTION_WEIGHTS``.
      inception_fc: Converted logits layer (``convert_inception --fc-out``), for IS; None
        reads ``$JAXDIFF_INCEPTION_FC``.
      expected_sha256: Passed to :func:`load_inception_variables` (None = its default).
      input_range: ``"minus_one_one"`` (jaxdiff samples) or ``"uint8"``.
      quantize: Quantise [-1, 1] samples to 8 bits first (as saved images are).
      batch_size: Images per Inception batch on the host path.
      k: Neighbour rank of precision/recall (ADM: 3).
      is_split_size: Samples per Inception Score split (ADM: 5000).
      kid_subsets: KID subsets.
      kid_subset_size: Samples per KID subset.

    Returns:
      An evaluator reporting, in this order, ``fid``, ``sfid``, ``inception_score``,
      ``precision``, ``recall``, ``kid``, ``kid_std`` (those asked for).

    Raises:
      InceptionWeightsNotFoundError: Without weights, saying how to make them.
      FileNotFoundError: For IS without the logits layer, saying how to make it.
      ValueError: For an unknown metric, a missing reference, or a reference of another
        feature space (each naming the file and the fix).
    """
    groups = _metric_groups(metrics)
    kw = {} if expected_sha256 is None else {"expected_sha256": expected_sha256}
    net = load_inception_variables(inception_weights, **kw)
    fc = _load_fc(inception_fc) if "is" in groups else None
    spatial = "sfid" in groups
    variables = (net, fc) if spatial or fc is not None else net
    ref = _Reference(groups, reference_stats, ref_batch, variables, batch_size)
    keep_rows = "prec_recall" in groups or "kid" in groups
    moments = ("spatial",) if spatial else ()
    if not keep_rows:
        moments = ("features", *moments)

    def reduce_fn(f, labels):
        del labels
        out: dict[str, float] = {}
        if "fid" in groups:
            out["fid"] = frechet_distance(*feature_moments(f["features"]), *ref.stats("pool"))
        if spatial:
            out["sfid"] = frechet_distance(*feature_moments(f["spatial"]), *ref.stats("spatial"))
        if fc is not None:
            out["inception_score"] = inception_score(f["logits"], split_size=is_split_size)
        if "prec_recall" in groups:
            out.update(precision_recall(ref.features["features"], f["features"], k=k))
        if "kid" in groups:
            out.update(
                kid(
                    ref.features["features"],
                    f["features"],
                    num_subsets=kid_subsets,
                    subset_size=kid_subset_size,
                )
            )
        return out

    fn = inception_feature_fn(input_range, quantize, spatial)
    name = "fid" if groups == ("fid",) else "inception"
    return Evaluator(name, variables, fn, reduce_fn, batch_size, INCEPTION_FEATURE, moments)


def fid_evaluator(**kwargs: Any) -> Evaluator:
    """FID against reference statistics: ``inception_evaluator(("fid",), **kwargs)``."""
    return inception_evaluator(("fid",), **kwargs)


__all__ = [
    "INCEPTION_DIM",
    "INCEPTION_FC_ENV",
    "INCEPTION_FEATURE",
    "INCEPTION_METRICS",
    "fid_evaluator",
    "inception_evaluator",
    "inception_feature_fn",
]
