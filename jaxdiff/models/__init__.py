"""Flax linen denoiser backbones (U-Net, DiT, MLP) and the digits classifier.

The denoisers share one call signature,
``model.apply(variables, x, noise_label, cond=None, *, train=False, variant=None)``, and
return float32 arrays shaped like ``x``; :class:`Classifier` maps
``(x, noise_label=None)`` to class logits (see :mod:`jaxdiff.models.classifier`). Every
parameter axis is named with a word from :data:`LOGICAL_AXES`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from jaxdiff.models.attention import ATTENTION_IMPLS, cudnn_attention_calls, resolve_attention
from jaxdiff.models.classifier import Classifier
from jaxdiff.models.dit import DIT_CONFIGS, DiT, dit_config
from jaxdiff.models.dit_layout import stack_blocks, to_layout, unstack_blocks
from jaxdiff.models.edm2 import EDM2_CONFIGS, EDM2UNet, force_weight_norm
from jaxdiff.models.layers import LOGICAL_AXES, VARIANTS
from jaxdiff.models.mlp import MLP
from jaxdiff.models.remat import REMAT_POLICIES, maybe_remat
from jaxdiff.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT, "mlp": MLP, "edm2": EDM2UNet}
"""Model classes by factory name."""


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a model by name.

    Args:
      name: ``"unet"``, ``"dit"``, ``"mlp"`` or ``"edm2"`` (case-insensitive). For DiT a
        size may follow, e.g. ``"dit-B/2"``, equivalent to ``DiT.from_name("B/2", **kwargs)``.
      **kwargs: Fields of the model class.

    Returns:
      The configured (uninitialised) module.

    Raises:
      ValueError: If the name is unknown, listing the allowed names.
    """
    key = name.lower()
    if key.startswith("dit-") or key.startswith("dit_"):
        return DiT.from_name(name[4:].upper(), **kwargs)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {tuple(MODELS)} (or 'dit-<size>/<p>')")
    return MODELS[key](**kwargs)


__all__ = [
    "ATTENTION_IMPLS",
    "DIT_CONFIGS",
    "EDM2_CONFIGS",
    "LOGICAL_AXES",
    "MLP",
    "MODELS",
    "REMAT_POLICIES",
    "VARIANTS",
    "Classifier",
    "DiT",
    "EDM2UNet",
    "UNet",
    "create_model",
    "cudnn_attention_calls",
    "dit_config",
    "force_weight_norm",
    "maybe_remat",
    "resolve_attention",
    "stack_blocks",
    "to_layout",
    "unstack_blocks",
]
