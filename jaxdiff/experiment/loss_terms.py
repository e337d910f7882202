"""The extra training losses a config switches on, built in one place.

Each method keeps its own config section and returns at most one
:class:`~jaxdiff.training.step.LossTerm`; the train step adds them to the denoising loss.
A config without any of these sections trains exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import ml_collections

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.repa import build_repa
from jaxdiff.training.smooth import BATCH_TARGET, SmoothTerm
from jaxdiff.training.step import LossTerm

TermBuilder = Callable[
    [ml_collections.ConfigDict, nn.Module, int, tuple[int, ...]], "LossTerm | None"
]

BUILDERS: dict[str, TermBuilder] = {}
"""Config section name -> builder ``(config, model, num_classes, sample_shape)``; a builder
returns None when its method is switched off."""


def build_smooth(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    num_classes: int,
    sample_shape: tuple[int, ...],
) -> SmoothTerm | None:
    """Smooth Diffusion's step-wise variation regulariser from ``config.smooth``.

    ``weight`` (0 = off) is the reference's ``lambda_reg``; ``target`` is ``"batch"`` (the
    stop-gradient batch mean of the variation) or a fixed number ``>= 0``.
    """
    del model, num_classes, sample_shape
    sc = config.smooth
    weight = sc.get("weight", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise InvalidArgumentError(
            f"config.smooth.weight={weight!r}: use 0 (off) or a positive number "
            "(Smooth Diffusion used 1.0)"
        )
    if weight == 0:
        return None
    target = sc.get("target", BATCH_TARGET)
    if target != BATCH_TARGET:
        try:
            target = float(target)
        except (TypeError, ValueError):
            target = -1.0
        if not target >= 0:
            raise InvalidArgumentError(
                f"config.smooth.target={sc.get('target')!r}: use {BATCH_TARGET!r} (the "
                "batch mean of the variation) or a fixed number >= 0, e.g. "
                "--config.smooth.target=0.1"
            )
    return SmoothTerm(weight=float(weight), target=target)


BUILDERS["smooth"] = build_smooth
BUILDERS["repa"] = build_repa  # needs the model built through experiment.repa.repa_model


def build_loss_terms(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    num_classes: int,
    sample_shape: tuple[int, ...],
) -> tuple[LossTerm, ...]:
    """The loss terms switched on in ``config`` (empty for a plain diffusion run).

    Args:
        config: the experiment config.
        model: the network the step trains.
        num_classes: classes of the conditional model (0 = unconditional).
        sample_shape: shape of one training example.

    Raises:
        InvalidArgumentError: from a builder, for a bad value in its section.
    """
    terms = []
    for section, build in BUILDERS.items():
        if section in config:
            term = build(config, model, num_classes, tuple(sample_shape))
            if term is not None:
                terms.append(term)
    return tuple(terms)
