"""REPA's projection head (Yu et al. 2024, "Representation Alignment for Generation").

REPA aligns a hidden activation of the denoiser with the patch features of a frozen
encoder (DINOv2 in the paper) through a small MLP, ``Linear -> SiLU -> Linear -> SiLU ->
Linear`` (hidden width 2048 in the paper), applied to every token. The UNet and the DiT
hold it as an optional submodule ``repa_projector``: it exists only when the model's
``repa_dim > 0`` (so a model without it, e.g. a published checkpoint, has exactly the
params it always had), runs only with ``train=True`` and sows its output into the
``"intermediates"`` collection as ``"repa"``, an ``[B, h, w, repa_dim]`` map over the
activation's token grid. Sampling (``train=False``) never computes it; the loss that reads
it is :mod:`jaxdiff.training.repa`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import dense

REPA_KEY = "repa"
"""Name of the projected activation in the ``"intermediates"`` collection."""


class RepaProjector(nn.Module):
    """REPA's per-token MLP ``Dense(hidden) -> SiLU -> Dense(hidden) -> SiLU -> Dense(out)``.

    Kernels are Xavier-uniform and biases zero, REPA's initialisation of every linear layer.

    Attributes:
      hidden: Hidden width (REPA: 2048).
      features: Output width, the frozen encoder's feature width.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    hidden: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """Projects ``[..., C]`` activations to ``[..., features]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # The hidden axes are named once each: a kernel naming one logical axis twice
        # could not be mapped onto a mesh.
        h = nn.silu(dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(h))
        h = nn.silu(dense(self.hidden, (None, "mlp"), name="fc2", **kw)(h))
        return dense(self.features, ("mlp", None), name="fc3", **kw)(h)


def check_repa_fields(
    hidden: int, dim: int, field: str, layer: Any, allowed: Sequence[Any]
) -> None:
    """Raises ValueError for bad REPA fields of a model.

    Args:
      hidden: The model's ``repa_hidden``.
      dim: The model's ``repa_dim`` (0 = no projector: nothing else is checked).
      field: Name of the model's layer field (``"repa_layer"``, ``"repa_depth"``).
      layer: Its value.
      allowed: The values it may take.
    """
    if dim < 0:
        raise ValueError(f"repa_dim={dim} must be >= 0 (0 = no REPA projector)")
    if dim == 0:
        return
    if hidden < 1:
        raise ValueError(f"repa_hidden={hidden} must be >= 1 (REPA uses 2048)")
    if layer not in allowed:
        raise ValueError(
            f"{field}={layer!r} names no activation of this model; use one of {list(allowed)}"
        )


def repa_project(
    module: nn.Module,
    h: jax.Array,
    *,
    train: bool,
    hidden: int,
    features: int,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
) -> None:
    """Runs REPA's projector on ``h`` inside ``module`` and sows the result as ``"repa"``.

    Call it from the model's compact ``__call__`` at the aligned activation. With
    ``features == 0`` it does nothing; with ``train=False`` it only creates the params
    (at ``init``, so sampling restores the trained tree) and otherwise computes nothing.

    Args:
      module: The model (a bound, compact module); the params live under its
        ``repa_projector``.
      h: ``[B, h, w, C]`` activation on its token grid.
      train: Whether this is a training pass.
      hidden: The projector's hidden width.
      features: The encoder's feature width (0 = no projector).
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """
    if features <= 0:
        return
    initializing = module.is_initializing()
    if not (train or initializing):
        return
    projector = RepaProjector(
        hidden, features, dtype=dtype, param_dtype=param_dtype, name="repa_projector"
    )
    z = projector(h)
    if not initializing:  # stored only when the caller makes "intermediates" mutable
        module.sow("intermediates", REPA_KEY, z)


__all__ = ["REPA_KEY", "RepaProjector", "check_repa_fields", "repa_project"]
