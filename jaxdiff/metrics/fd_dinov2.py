"""FD-DINOv2 (EDM2's metric): the Frechet distance of DINOv2 ViT CLS features.

:func:`fd_dinov2_evaluator` is the ``"fd_dinov2"`` evaluator of
:func:`jaxdiff.metrics.get_evaluator`; the network and EDM2's preprocessing are in
:mod:`jaxdiff.metrics.dinov2`. Statistics of real data:
``python -m jaxdiff.metrics.reference_stats --evaluator=fd_dinov2 --dinov2_weights=FILE``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

from jaxdiff.metrics.dinov2 import dinov2_features, load_dinov2_params
from jaxdiff.metrics.evaluator import Evaluator, feature_moments
from jaxdiff.metrics.frechet import frechet_distance
from jaxdiff.metrics.statistics import ReferenceStatistics

DINOV2_WEIGHTS_ENV = "JAXDIFF_DINOV2_WEIGHTS"
"""Environment variable naming the converted DINOv2 weights (used when none are passed)."""


def dinov2_feature_fn(config: Any, input_range: str, quantize: bool) -> Callable:
    """``(params, images) -> {"features": [B, D]}``: EDM2's FD-DINOv2 features."""

    def feature_fn(params, images):
        # float32 matmuls at full precision: the features feed a Frechet distance.
        with jax.default_matmul_precision("highest"):
            feats = dinov2_features(
                params, images, config=config, input_range=input_range, quantize=quantize
            )
        return {"features": feats}

    return feature_fn


def dinov2_feature_name(config: Any) -> str:
    """Feature-space name stored in FD-DINOv2 statistics, e.g. ``dinov2_d1024_l24``."""
    return f"dinov2_d{config.embed_dim}_l{config.depth}"


def fd_dinov2_evaluator(
    *,
    reference_stats: str | os.PathLike | None = None,
    dinov2_weights: str | os.PathLike | None = None,
    input_range: str = "minus_one_one",
    quantize: bool = True,
    batch_size: int = 50,
) -> Evaluator:
    """FD-DINOv2 (EDM2): Frechet distance of DINOv2 CLS features against reference stats.

    Args:
      reference_stats: Statistics file of the reference set in the same feature space
        (``python -m jaxdiff.metrics.reference_stats --evaluator=fd_dinov2``).
      dinov2_weights: A file from ``python -m jaxdiff.metrics.convert_dinov2`` (EDM2 uses
        ViT-L/14); None reads ``$JAXDIFF_DINOV2_WEIGHTS``.
      input_range: ``"minus_one_one"`` (jaxdiff samples) or ``"uint8"``.
      quantize: Round [-1, 1] samples to 8 bits first (EDM2 evaluates saved images).
      batch_size: Images per batch on the host path.

    Raises:
      FileNotFoundError: Without weights, saying how to convert them.
      ValueError: Without ``reference_stats``, or with statistics of another space.
    """
    params, config = load_dinov2_weights(dinov2_weights)
    name = dinov2_feature_name(config)
    hint = (
        "make them with `python -m jaxdiff.metrics.reference_stats --dataset=NAME "
        "--evaluator=fd_dinov2 --dinov2_weights=FILE --out=FILE`"
    )
    if reference_stats is None:
        raise ValueError(f"FD-DINOv2 needs reference statistics: pass reference_stats=; {hint}")
    stats = ReferenceStatistics.load(reference_stats)
    stats.check_compatible(name, config.embed_dim, path=reference_stats, hint=hint)
    mu_ref, sigma_ref = stats.mu, stats.sigma

    def reduce_fn(f, labels):
        del labels
        mu, sigma = feature_moments(f["features"])
        return {"fd_dinov2": frechet_distance(mu, sigma, mu_ref, sigma_ref)}

    feature_fn = dinov2_feature_fn(config, input_range, quantize)
    return Evaluator("fd_dinov2", params, feature_fn, reduce_fn, batch_size, name, ("features",))


def load_dinov2_weights(path: str | os.PathLike | None) -> tuple[Any, Any]:
    """``(params, config)`` from ``path`` or ``$JAXDIFF_DINOV2_WEIGHTS``.

    Raises:
      FileNotFoundError: When neither names a file, saying how to make one.
    """
    path = path or os.environ.get(DINOV2_WEIGHTS_ENV)
    if not path:
        raise FileNotFoundError(
            "FD-DINOv2 needs converted DINOv2 weights: download dinov2_vitl14_pretrain.pth "
            "(facebookresearch/dinov2), run `python -m jaxdiff.metrics.convert_dinov2 "
            "--src dinov2_vitl14_pretrain.pth --dst dinov2_vitl14.safetensors`, then pass "
            f"dinov2_weights=<that file> (--dinov2_weights) or set ${DINOV2_WEIGHTS_ENV}"
        )
    return load_dinov2_params(path)


__all__ = [
    "DINOV2_WEIGHTS_ENV",
    "dinov2_feature_fn",
    "dinov2_feature_name",
    "fd_dinov2_evaluator",
    "load_dinov2_weights",
]
