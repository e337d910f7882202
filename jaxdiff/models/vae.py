"""The KL-regularised image autoencoder of Stable Diffusion (diffusers' ``AutoencoderKL``).

The maths follows ``diffusers.AutoencoderKL`` (version 0.31.0) layer for layer, so weights
converted by :mod:`jaxdiff.pretrained.vae` reproduce its outputs; the layout is NHWC and
images live in ``[-1, 1]``. For ``block_out_channels`` of length L:

* encoder: 3x3 conv to ``block_out_channels[0]``; per level ``layers_per_block`` residual
  blocks, then (except at the last level) a stride-2 3x3 conv after padding the input by
  one pixel at the bottom and right only (diffusers' ``Downsample2D(padding=0)``); a
  middle block (residual, single-head self-attention, residual); GroupNorm -> SiLU ->
  3x3 conv to ``2 * latent_channels`` (posterior mean and log-variance);
* optional 1x1 ``quant_conv`` on the moments and ``post_quant_conv`` on the latents (the
  SD1/SDXL VAEs have them, the SD3/FLUX VAEs do not);
* decoder: 3x3 conv to ``block_out_channels[-1]``; the middle block; per level (widest
  first) ``layers_per_block + 1`` residual blocks, then (except at the last level) a
  nearest-neighbour 2x upsampling and a 3x3 conv; GroupNorm -> SiLU -> 3x3 conv.

Residual blocks are GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU -> conv plus the input
(through a 1x1 conv when the width changes). Every GroupNorm has ``norm_num_groups``
groups and epsilon 1e-6. The attention has one head as wide as the features, the softmax
runs in float32 (diffusers' ``upcast_softmax``). Posterior moments and decoded images are
returned in float32 whatever the compute ``dtype``.

Logical axes follow :mod:`jaxdiff.models.layers`: conv kernels
``("conv_h", "conv_w", "embed", "mlp")``, attention projections ``("embed", "mlp")``
(output ``("mlp", "embed")``), norms ``("norm",)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import dense, ones, partitioned, xavier, zeros

LOGVAR_RANGE: tuple[float, float] = (-30.0, 20.0)
"""Clip range of the posterior log-variance (as diffusers' DiagonalGaussianDistribution)."""


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior ``N(mean, exp(logvar))``, a pytree (returnable from jit).

    Attributes:
      mean: ``[B, h, w, latent_channels]`` float32 means.
      logvar: Log-variances of the same shape, clipped to :data:`LOGVAR_RANGE`.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Splits ``[..., 2C]`` encoder moments into mean and (clipped) log-variance.

        Args:
          moments: Encoder output; the first C channels are the mean.

        Returns:
          The posterior, in float32.
        """
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        """Standard deviation ``exp(logvar / 2)``."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        """Variance ``exp(logvar)``."""
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """Draws ``mean + std * n`` with ``n ~ N(0, I)`` from ``key``."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        """The most likely latent, i.e. the mean."""
        return self.mean

    def kl(self) -> jax.Array:
        """KL divergence to ``N(0, I)`` per example, summed over the latent, shape ``[B]``."""
        terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, self.mean.ndim)))


def _conv(features: int, kernel: int, *, padding, stride: int = 1, name=None, **kw) -> nn.Conv:
    # One place for the conv's axis names; ``padding`` is explicit because the
    # downsampling conv pads asymmetrically outside the layer.
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        kernel_init=partitioned(xavier, ("conv_h", "conv_w", "embed", "mlp")),
        bias_init=partitioned(zeros, ("mlp",)),
        name=name,
        **kw,
    )


def _norm(groups: int, name: str, **kw) -> nn.GroupNorm:
    # Two-pass variance (use_fast_variance=False) like torch's GroupNorm: E[x^2] - E[x]^2
    # loses digits when the mean is large next to the spread.
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=1e-6,
        use_fast_variance=False,
        scale_init=partitioned(ones, ("norm",)),
        bias_init=partitioned(zeros, ("norm",)),
        name=name,
        **kw,
    )


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without a time embedding.

    Attributes:
      features: Output channels.
      groups: GroupNorm groups.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    features: int
    groups: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[B, H, W, C_in]`` to ``[B, H, W, features]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pad = ((1, 1), (1, 1))
        h = nn.silu(_norm(self.groups, "norm1", **kw)(x))
        h = _conv(self.features, 3, padding=pad, name="conv1", **kw)(h)
        h = nn.silu(_norm(self.groups, "norm2", **kw)(h))
        h = _conv(self.features, 3, padding=pad, name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, padding="VALID", name="conv_shortcut", **kw)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head residual self-attention over the pixels (diffusers' VAE ``Attention``).

    Attributes:
      groups: GroupNorm groups.
      attention_impl: ``implementation=`` of :func:`jax.nn.dot_product_attention`
        (None lets JAX choose; its XLA path computes logits and softmax in float32).
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    groups: int
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[B, H, W, C]`` to ``[B, H, W, C]``."""
        b, height, width, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _norm(self.groups, "group_norm", **kw)(x).reshape(b, height * width, 1, c)
        q, k, v = (dense(c, ("embed", "mlp"), name=n, **kw)(h) for n in ("to_q", "to_k", "to_v"))
        h = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        h = dense(c, ("mlp", "embed"), name="to_out", **kw)(h.reshape(b, height * width, c))
        return x + h.reshape(b, height, width, c)


class MidBlock(nn.Module):
    """Residual block, optional attention, residual block, at constant width.

    Attributes:
      groups: GroupNorm groups.
      add_attention: Whether the attention layer exists.
      attention_impl: See :class:`AttentionBlock`.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    groups: int
    add_attention: bool = True
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[B, H, W, C]`` to ``[B, H, W, C]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = AttentionBlock(self.groups, self.attention_impl, name="attention", **kw)(x)
        return ResnetBlock(c, self.groups, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
    """Images ``[B, H, W, in]`` to moments ``[B, H/f, W/f, 2 * latent_channels]``, f = 2^(L-1).

    Attributes:
      block_out_channels: Width per level.
      layers_per_block: Residual blocks per level.
      norm_num_groups: GroupNorm groups.
      latent_channels: Latent channels (the output has twice as many).
      mid_block_add_attention: Whether the middle block has attention.
      attention_impl: See :class:`AttentionBlock`.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    latent_channels: int = 4
    mid_block_add_attention: bool = True
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Encodes images to the posterior's moments (mean channels first)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups, pad = self.norm_num_groups, ((1, 1), (1, 1))
        h = _conv(self.block_out_channels[0], 3, padding=pad, name="conv_in", **kw)(x)
        last = len(self.block_out_channels) - 1
        for i, width in enumerate(self.block_out_channels):
            for j in range(self.layers_per_block):
                h = ResnetBlock(width, groups, name=f"down_blocks_{i}_resnets_{j}", **kw)(h)
            if i != last:
                # diffusers pads zeros at the bottom and right only, then a valid
                # stride-2 conv: odd sizes and pixel alignment match that exactly.
                h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                name = f"down_blocks_{i}_downsample"
                h = _conv(width, 3, padding="VALID", stride=2, name=name, **kw)(h)
        h = MidBlock(
            groups, self.mid_block_add_attention, self.attention_impl, name="mid_block", **kw
        )(h)
        h = nn.silu(_norm(groups, "conv_norm_out", **kw)(h))
        return _conv(2 * self.latent_channels, 3, padding=pad, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """Latents ``[B, h, w, latent_channels]`` to images ``[B, h * f, w * f, out_channels]``.

    Attributes:
      block_out_channels: Width per level (as in the encoder; used widest first).
      layers_per_block: The encoder's; each decoder level has one more residual block.
      norm_num_groups: GroupNorm groups.
      out_channels: Image channels.
      mid_block_add_attention: Whether the middle block has attention.
      attention_impl: See :class:`AttentionBlock`.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    out_channels: int = 3
    mid_block_add_attention: bool = True
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """Decodes latents (after ``post_quant_conv``) to images."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups, pad = self.norm_num_groups, ((1, 1), (1, 1))
        h = _conv(self.block_out_channels[-1], 3, padding=pad, name="conv_in", **kw)(z)
        h = MidBlock(
            groups, self.mid_block_add_attention, self.attention_impl, name="mid_block", **kw
        )(h)
        widths = list(reversed(self.block_out_channels))
        for i, width in enumerate(widths):
            for j in range(self.layers_per_block + 1):
                h = ResnetBlock(width, groups, name=f"up_blocks_{i}_resnets_{j}", **kw)(h)
            if i != len(widths) - 1:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest neighbour
                h = _conv(width, 3, padding=pad, name=f"up_blocks_{i}_upsample", **kw)(h)
        h = nn.silu(_norm(groups, "conv_norm_out", **kw)(h))
        return _conv(self.out_channels, 3, padding=pad, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """The Stable Diffusion VAE: :class:`Encoder`, posterior, :class:`Decoder`.

    ``model.init(key, images)`` creates every parameter (``__call__`` encodes and decodes);
    use ``model.apply(variables, images, method="encode")`` and ``method="decode"``.
    Raw latents are the decoder's input; diffusion models see them scaled (see
    :class:`jaxdiff.pretrained.vae.LatentScaling`).

    Attributes:
      in_channels: Image channels.
      out_channels: Decoded image channels.
      block_out_channels: Width per level; the latent is ``2^(L-1)`` times smaller.
      layers_per_block: Residual blocks per encoder level.
      norm_num_groups: GroupNorm groups (every width must divide by it).
      latent_channels: Latent channels.
      use_quant_conv: Whether a 1x1 conv follows the encoder.
      use_post_quant_conv: Whether a 1x1 conv precedes the decoder.
      mid_block_add_attention: Whether the middle blocks have attention.
      attention_impl: ``implementation=`` of :func:`jax.nn.dot_product_attention`.
      dtype: Compute dtype (outputs are float32 regardless).
      param_dtype: Parameter dtype.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    latent_channels: int = 4
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def downscale(self) -> int:
        """Ratio of image to latent side, ``2^(L-1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self) -> None:
        """Creates the submodules (setup-style so ``encode``/``decode`` work alone)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
            attention_impl=self.attention_impl,
            **kw,
        )
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        c = self.latent_channels
        if self.use_quant_conv:
            self.quant_conv = _conv(2 * c, 1, padding="VALID", **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = _conv(c, 1, padding="VALID", **kw)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """Encodes ``[B, H, W, in_channels]`` images in ``[-1, 1]`` to the posterior.

        Args:
          images: Images; H and W should be multiples of :attr:`downscale`.

        Returns:
          The posterior over raw latents ``[B, H/f, W/f, latent_channels]`` (float32).
        """
        moments = self.encoder(images.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Decodes raw (unscaled) latents to float32 images (nominally in ``[-1, 1]``)."""
        z = latents.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstructs images: decode a posterior sample (``key``) or its mode (None)."""
        posterior = self.encode(images)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z)


__all__ = [
    "LOGVAR_RANGE",
    "AttentionBlock",
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussian",
    "Encoder",
    "MidBlock",
    "ResnetBlock",
]
