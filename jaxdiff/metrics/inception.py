"""The FID Inception-v3 network (pool3, 2048-d) in Flax linen, with weights from a file.

This is the network every published FID number uses: TensorFlow's 2015-12-05 Inception
graph as ported by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``), including the
FID-specific quirks that differ from torchvision's Inception-v3:

* ``Mixed_5b/5c/5d`` (FIDInceptionA), ``Mixed_6b..6e`` (FIDInceptionC) and ``Mixed_7b``
  (FIDInceptionE_1) average-pool their pool branch with ``count_include_pad=False``
  (TensorFlow ignores the zero padding when averaging);
* ``Mixed_7c`` (FIDInceptionE_2) max-pools its pool branch instead of averaging;
* every conv is bias-free and followed by inference-mode BatchNorm (eps 1e-3) and ReLU;
* the features are the global average pool of ``Mixed_7c``: ``[B, 2048]``.

Input (see :func:`preprocess`): images are resized to 299x299 with bilinear
interpolation, half-pixel centres and no antialiasing (``F.interpolate(...,
mode="bilinear", align_corners=False)``, as pytorch-fid does), and fed in [-1, 1].
Float images in [-1, 1] (jaxdiff's sample range) are by default first quantised to the
256 levels of an 8-bit image, as if saved to PNG and read back, which is what reference
pipelines evaluate; ``uint8`` images in [0, 255] are mapped by ``u / 127.5 - 1``.
Grayscale images are repeated to 3 channels.

``InceptionV3(...)(x, return_spatial=True)`` also returns ADM's sFID feature map
(``Mixed_6d``, first 7 channels); :mod:`jaxdiff.metrics.inception_heads` builds the sFID
features, the 1008-way logits and the Inception Score on it. Parity with pytorch-fid
0.3.0 (features to 1e-4, FID to 0.1 %) is tested in ``tests/test_metrics_inception_parity.py``.

Weights are never downloaded: :mod:`jaxdiff.metrics.inception_weights` finds, checks
and loads the local ``.npz`` that ``python -m jaxdiff.metrics.convert_inception`` makes;
its public names are re-exported here.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.metrics.inception_weights import (
    INCEPTION_SHA256,
    INCEPTION_WEIGHTS_ENV,
    PTH_FILENAME,
    PTH_URL,
    InceptionWeightsNotFoundError,
    inception_variable_shapes,
    load_inception_variables,
    random_inception_variables,
    resolve_weights_path,
    save_inception_variables,
)

FEATURE_DIM = 2048
"""Width of the pool3 features."""

INPUT_SIZE = 299
"""Side of the network's input images."""

SPATIAL_CHANNELS = 7
"""Channels of ``Mixed_6d`` (TF ``mixed_6/conv``) that ADM's sFID keeps."""


def _pool_same(x: jax.Array, kind: str) -> jax.Array:
    """3x3, stride 1, padding 1 pooling; average excludes the padding (TF semantics)."""
    pad = ((1, 1), (1, 1))
    if kind == "max":
        return nn.max_pool(x, (3, 3), strides=(1, 1), padding=pad)
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=pad, count_include_pad=False)


def _max_pool_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class BasicConv(nn.Module):
    """Bias-free conv, inference BatchNorm (eps 1e-3), ReLU: torchvision's BasicConv2d.

    Attributes:
      features: Output channels.
      kernel: ``(kh, kw)``.
      stride: Stride in both directions.
      padding: Symmetric ``(ph, pw)`` zero padding.
      dtype: Compute dtype.
    """

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to ``[B, H, W, C]``."""
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


class InceptionA(nn.Module):
    """FIDInceptionA (``Mixed_5b..5d``): 1x1, 5x5, double 3x3 and avg-pool branches.

    Attributes:
      pool_features: Channels of the pool branch.
      dtype: Compute dtype.
    """

    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        c = functools.partial(BasicConv, dtype=self.dtype)
        b1 = c(64, name="branch1x1")(x)
        b5 = c(48, name="branch5x5_1")(x)
        b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = c(64, name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, name="branch_pool")(_pool_same(x, "avg"))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """InceptionB (``Mixed_6a``): stride-2 reduction 35x35 -> 17x17.

    Attributes:
      dtype: Compute dtype.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        c = functools.partial(BasicConv, dtype=self.dtype)
        b3 = c(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = c(64, name="branch3x3dbl_1")(x)
        bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = c(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC (``Mixed_6b..6e``): factorised 7x7 branches and avg-pool branch.

    Attributes:
      channels_7x7: Width inside the 7x7 branches.
      dtype: Compute dtype.
    """

    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        c = functools.partial(BasicConv, dtype=self.dtype)
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = c(192, name="branch1x1")(x)
        b7 = c(c7, name="branch7x7_1")(x)
        b7 = c(c7, **row, name="branch7x7_2")(b7)
        b7 = c(192, **col, name="branch7x7_3")(b7)
        bd = c(c7, name="branch7x7dbl_1")(x)
        bd = c(c7, **col, name="branch7x7dbl_2")(bd)
        bd = c(c7, **row, name="branch7x7dbl_3")(bd)
        bd = c(c7, **col, name="branch7x7dbl_4")(bd)
        bd = c(192, **row, name="branch7x7dbl_5")(bd)
        bp = c(192, name="branch_pool")(_pool_same(x, "avg"))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """InceptionD (``Mixed_7a``): stride-2 reduction 17x17 -> 8x8.

    Attributes:
      dtype: Compute dtype.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        c = functools.partial(BasicConv, dtype=self.dtype)
        b3 = c(192, name="branch3x3_1")(x)
        b3 = c(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = c(192, name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (``pool="avg"``, ``Mixed_7b``) / E_2 (``pool="max"``, ``Mixed_7c``).

    Attributes:
      pool: ``"avg"`` (padding excluded) or ``"max"`` for the pool branch.
      dtype: Compute dtype.
    """

    pool: str = "avg"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        c = functools.partial(BasicConv, dtype=self.dtype)
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = c(320, name="branch1x1")(x)
        b3 = c(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [c(384, **row, name="branch3x3_2a")(b3), c(384, **col, name="branch3x3_2b")(b3)],
            axis=-1,
        )
        bd = c(448, name="branch3x3dbl_1")(x)
        bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [c(384, **row, name="branch3x3dbl_3a")(bd), c(384, **col, name="branch3x3dbl_3b")(bd)],
            axis=-1,
        )
        bp = c(192, name="branch_pool")(_pool_same(x, self.pool))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 up to the pool3 features.

    Submodule names follow pytorch-fid / torchvision (``Conv2d_1a_3x3``, ``Mixed_5b``,
    ``branch1x1``, ``conv``, ``bn``...), so converted weights map one to one. Variables:
    ``params`` (conv ``kernel``, BN ``scale``/``bias``) and ``batch_stats`` (BN
    ``mean``/``var``); inference only.

    Attributes:
      dtype: Compute dtype (float32 for reference-comparable numbers).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, return_spatial: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Computes pool3 features and, optionally, ADM's spatial (sFID) feature map.

        Args:
          x: ``[B, H, W, 3]`` images already in [-1, 1] and resized (see
            :func:`preprocess`); H, W >= 75.
          return_spatial: Also return the first :data:`SPATIAL_CHANNELS` channels of
            ``Mixed_6d``'s output, which are its ``branch1x1`` (concatenated first): the TF
            graph's ``mixed_6/conv:0`` (post-ReLU) that ADM's evaluator keeps for sFID.

        Returns:
          ``[B, 2048]`` float32 features, or ``(features, spatial)`` with ``spatial``
          ``[B, h, w, 7]`` float32 (17x17 at 299 px) when ``return_spatial``.
        """
        c = functools.partial(BasicConv, dtype=self.dtype)
        kw = dict(dtype=self.dtype)
        x = x.astype(self.dtype)
        x = c(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_s2(x)
        x = c(80, name="Conv2d_3b_1x1")(x)
        x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_s2(x)
        x = InceptionA(32, name="Mixed_5b", **kw)(x)
        x = InceptionA(64, name="Mixed_5c", **kw)(x)
        x = InceptionA(64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(c7, name=name, **kw)(x)
            if name == "Mixed_6d":
                spatial = x[..., :SPATIAL_CHANNELS].astype(jnp.float32)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE("avg", name="Mixed_7b", **kw)(x)
        x = InceptionE("max", name="Mixed_7c", **kw)(x)
        pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return (pool3, spatial) if return_spatial else pool3


def preprocess(
    images: jax.Array,
    *,
    input_range: str = "minus_one_one",
    quantize: bool = True,
    size: int = INPUT_SIZE,
) -> jax.Array:
    """Maps images to the network input: 3 channels, ``size`` x ``size``, [-1, 1].

    Args:
      images: ``[B, H, W, C]`` with C in {1, 3}.
      input_range: ``"minus_one_one"``: floats in [-1, 1] (jaxdiff samples), clipped;
        ``"uint8"``: values 0..255 (any dtype), mapped by ``u / 127.5 - 1``.
      quantize: For ``"minus_one_one"``, round to the 256 levels of an 8-bit image first
        (``round((x + 1) * 127.5)``), matching a PNG round trip as in reference tools.
      size: Output side (299 for FID; smaller only for tests).

    Returns:
      ``[B, size, size, 3]`` float32.

    Raises:
      ValueError: For an unknown ``input_range`` or channel count.
    """
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [B, H, W, 1 or 3], got {x.shape}")
    if input_range == "uint8":
        x = x.astype(jnp.float32) / 127.5 - 1.0
    elif input_range == "minus_one_one":
        x = jnp.clip(x.astype(jnp.float32), -1.0, 1.0)
        if quantize:
            x = jnp.round((x + 1.0) * 127.5) / 127.5 - 1.0
    else:
        raise ValueError(f"input_range must be 'minus_one_one' or 'uint8', got {input_range!r}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
    return x


def inception_features(
    variables: Any,
    images: jax.Array,
    *,
    input_range: str = "minus_one_one",
    quantize: bool = True,
    size: int = INPUT_SIZE,
) -> jax.Array:
    """Pool3 features of raw images: :func:`preprocess` then :class:`InceptionV3`.

    Pure and jittable; shard ``images`` over the batch axes for sharded evaluation.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` (see
        :func:`load_inception_variables`).
      images: ``[B, H, W, C]`` images, see :func:`preprocess`.
      input_range: See :func:`preprocess`.
      quantize: See :func:`preprocess`.
      size: See :func:`preprocess`.

    Returns:
      ``[B, 2048]`` float32 features.
    """
    x = preprocess(images, input_range=input_range, quantize=quantize, size=size)
    return InceptionV3().apply(variables, x)


__all__ = [
    "FEATURE_DIM",
    "INCEPTION_SHA256",
    "INCEPTION_WEIGHTS_ENV",
    "INPUT_SIZE",
    "PTH_FILENAME",
    "PTH_URL",
    "SPATIAL_CHANNELS",
    "InceptionV3",
    "InceptionWeightsNotFoundError",
    "inception_features",
    "inception_variable_shapes",
    "load_inception_variables",
    "preprocess",
    "random_inception_variables",
    "resolve_weights_path",
    "save_inception_variables",
]
