"""The extra training losses a config switches on, built in one place.

Each method keeps its own config section and returns at most one
:class:`~jaxdiff.training.step.LossTerm`; the train step adds them to the denoising loss.
A config without any of these sections trains exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import ml_collections

from jaxdiff.training.step import LossTerm

TermBuilder = Callable[
    [ml_collections.ConfigDict, nn.Module, int, tuple[int, ...]], "LossTerm | None"
]

BUILDERS: dict[str, TermBuilder] = {}
"""Config section name -> builder ``(config, model, num_classes, sample_shape)``; a builder
returns None when its method is switched off."""


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
