"""REPA's alignment loss (Yu et al. 2024, "Representation Alignment for Generation").

The denoiser's projected activation ``z`` (the model's ``repa_projector`` output, sown as
``"repa"`` by the denoising pass itself: no extra forward) is pulled towards the patch
features ``y`` of a frozen encoder on the *clean* training images::

    L_repa = weight * mean_{b, n} -cos(z_{b,n}, y_{b,n})

exactly REPA's ``proj_loss`` (both sides L2-normalised per token, ``F.normalize``'s
``eps = 1e-12``; the mean over batch and tokens; averaged over encoders, here one) times
``proj_coeff`` (0.5 in the paper). The encoder runs inside the jitted step under
``stop_gradient``, its params entering as the step's frozen argument
(:attr:`~jaxdiff.training.step.LossInputs.frozen`), never as compiled constants.

When the encoder's token grid differs from the model's, the encoder features are
resampled onto the model's grid (:func:`resample_grid`) before normalising: average
pooling for an integer shrink, nearest-neighbour repetition for an integer growth,
bilinear otherwise. REPA itself sizes images so the grids match (256 px -> 224 px for
DINOv2's 16 x 16 patches = SiT/2's 16 x 16 latent tokens).

Encoders (:class:`RepaEncoder`): the shipped digits classifier's stage feature map
(:func:`classifier_encoder`, the 4 x 4 x 32 map on 8 x 8 digits) and DINOv2's
``x_norm_patchtokens`` from converted weights (:func:`dinov2_encoder`, REPA's
preprocessing: ``[0, 1]`` pixels, ImageNet normalisation, torch's bicubic resize to
``224 * max(1, H // 256)``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.metrics.classifier import load_classifier
from jaxdiff.metrics.dinov2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_SIZE,
    DINOv2ViT,
    cubic_matrix,
    load_dinov2_params,
)
from jaxdiff.models.classifier import Classifier
from jaxdiff.models.repa import REPA_KEY
from jaxdiff.training.step import LossInputs

NORMALIZE_EPS = 1e-12
"""``torch.nn.functional.normalize``'s default eps (REPA normalises with it)."""


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / max(||x||, eps)`` over the last axis, as ``F.normalize``."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, NORMALIZE_EPS)


def repa_loss(z: jax.Array, y: jax.Array) -> jax.Array:
    """REPA's ``proj_loss``: ``mean_{b, n} -cos(z_{b,n}, y_{b,n})``, in float32.

    Args:
      z: ``[B, ..., D]`` projected model tokens.
      y: Encoder features of the same shape.

    Returns:
      Scalar in [-1, 1] (-1 = perfectly aligned).
    """
    if z.shape != y.shape:
        raise ValueError(f"projected tokens {z.shape} and encoder features {y.shape} differ")
    z, y = l2_normalize(z.astype(jnp.float32)), l2_normalize(y.astype(jnp.float32))
    return -jnp.mean(jnp.sum(z * y, axis=-1))


def resample_grid(y: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Resamples ``[B, h, w, C]`` features onto a ``grid = (H, W)`` token grid.

    Integer shrink (``h = k H``): the mean of each ``k x k`` block; integer growth
    (``H = k h``): each token repeated ``k x k`` times; otherwise bilinear
    (``jax.image.resize``, antialiased when shrinking).
    """
    b, h, w, c = y.shape
    gh, gw = grid
    if (h, w) == (gh, gw):
        return y
    if h % gh == 0 and w % gw == 0:
        return y.reshape(b, gh, h // gh, gw, w // gw, c).mean(axis=(2, 4))
    if gh % h == 0 and gw % w == 0:
        return jnp.repeat(jnp.repeat(y, gh // h, axis=1), gw // w, axis=2)
    return jax.image.resize(y, (b, gh, gw, c), "linear")


@dataclasses.dataclass(frozen=True, eq=False)
class RepaEncoder:
    """A frozen feature network: ``apply(params, images) -> [B, h, w, dim]`` patch features.

    Attributes:
      name: What it is (for logs and errors).
      dim: Feature width (the model's ``repa_dim``).
      apply: Pure, jittable ``(params, images in [-1, 1], [B, H, W, C]) -> features``.
      params: Its params (passed to the step as an argument, never closed over).
    """

    name: str
    dim: int
    apply: Callable[[Any, jax.Array], jax.Array]
    params: Any


def classifier_encoder(stage: int = 1, path: str | os.PathLike | None = None) -> RepaEncoder:
    """The digits classifier's stage-``stage`` feature map (default: the shipped file).

    Args:
      stage: Conv stage (1: ``[B, 4, 4, 32]`` on 8 x 8 digits).
      path: A classifier file (None = the shipped, checksum-verified one).
    """
    clf = load_classifier(path)
    if not 0 <= stage < len(clf.model.channels):
        raise ValueError(f"stage={stage} out of range for channels {clf.model.channels}")
    model = clf.model

    def apply(params: Any, images: jax.Array) -> jax.Array:
        return model.apply({"params": params}, images, stage, method=Classifier.feature_map)

    return RepaEncoder(
        f"digits_classifier:stage{stage}", int(model.channels[stage]), apply, clf.params
    )


def dinov2_input_size(height: int) -> int:
    """REPA's DINOv2 input side ``224 * (H // 256)``, at least 224 (small images)."""
    return INPUT_SIZE * max(1, height // 256)


def dinov2_tokens(net: DINOv2ViT, params: Any, x: jax.Array) -> jax.Array:
    """All ``[B, 1 + N, D]`` final-normed tokens of DINOv2 (CLS first, then the patches).

    The last block's output is captured and normed with the network's final LayerNorm, so
    ``[:, 0]`` is exactly ``net.apply(...)`` (the normed CLS) and ``[:, 1:]`` upstream's
    ``x_norm_patchtokens``; the CLS-only head is dead code and compiled away.

    Args:
      net: The network.
      params: Its params.
      x: ImageNet-normalised ``[B, H, W, 3]`` images, sides multiples of the patch size.
    """
    last = f"blocks_{net.config.depth - 1}"
    _, state = net.apply(
        {"params": params},
        x,
        capture_intermediates=lambda m, method: m.name == last and method == "__call__",
    )
    (tokens,) = state["intermediates"][last]["__call__"]
    return nn.LayerNorm(epsilon=1e-6).apply({"params": params["norm"]}, tokens)


def dinov2_encoder(path: str | os.PathLike) -> RepaEncoder:
    """DINOv2's normed patch tokens (``x_norm_patchtokens``) from a converted weights file.

    Args:
      path: A file written by ``python -m jaxdiff.metrics.convert_dinov2``.
    """
    params, config = load_dinov2_params(path)
    net = DINOv2ViT(config)

    def apply(params: Any, images: jax.Array) -> jax.Array:
        b, h, w, _ = images.shape
        x = (jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        size = (dinov2_input_size(h), dinov2_input_size(w))
        rows = jnp.asarray(cubic_matrix(h, size[0], size[0] / h))
        cols = jnp.asarray(cubic_matrix(w, size[1], size[1] / w))
        hi = jax.lax.Precision.HIGHEST
        x = jnp.einsum("bhwc,vw->bhvc", x, cols, precision=hi)
        x = jnp.einsum("bhwc,uh->buwc", x, rows, precision=hi)
        normed = dinov2_tokens(net, params, x)
        p = config.patch_size
        return normed[:, 1:].reshape(b, size[0] // p, size[1] // p, config.embed_dim)

    return RepaEncoder(f"dinov2:{os.fspath(path)}", config.embed_dim, apply, params)


@dataclasses.dataclass(frozen=True, eq=False)
class RepaTerm:
    """REPA as a :class:`~jaxdiff.training.step.LossTerm` (see the module docstring).

    Reads the model's ``"repa"`` intermediate (a model built with ``repa_dim ==
    encoder.dim``) and the encoder's features of ``batch["image"]``.

    Attributes:
      weight: REPA's ``proj_coeff`` (lambda; the paper: 0.5).
      encoder: The frozen encoder.
      name: Metric prefix.
      captures: Always True (the term reads the denoising pass's intermediates).
    """

    weight: float
    encoder: RepaEncoder
    name: str = "repa"
    captures: bool = True

    @property
    def frozen(self) -> Any:
        """The encoder's params: the step's frozen argument."""
        return self.encoder.params

    def __call__(self, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns ``(weight * proj_loss, {"cos": mean cosine similarity})``."""
        if REPA_KEY not in inputs.intermediates:
            raise ValueError(
                f"the model sowed no {REPA_KEY!r} intermediate: build it with a REPA "
                f"projector (repa_dim={self.encoder.dim} and the layer to align)"
            )
        (z,) = inputs.intermediates[REPA_KEY]
        if z.shape[-1] != self.encoder.dim:
            raise ValueError(
                f"the model's REPA projector has width {z.shape[-1]} but the encoder "
                f"{self.encoder.name} gives {self.encoder.dim} features: set repa_dim to it"
            )
        frozen = self.encoder.params if inputs.frozen is None else inputs.frozen
        y = jax.lax.stop_gradient(self.encoder.apply(frozen, inputs.batch["image"]))
        loss = repa_loss(z, resample_grid(y, z.shape[1:3]))
        return self.weight * loss, {"cos": -loss}


__all__ = [
    "RepaEncoder",
    "RepaTerm",
    "classifier_encoder",
    "dinov2_encoder",
    "dinov2_input_size",
    "dinov2_tokens",
    "l2_normalize",
    "repa_loss",
    "resample_grid",
]
