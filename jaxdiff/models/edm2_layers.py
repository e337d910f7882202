"""Magnitude-preserving layers of the EDM2 U-Net (Karras et al., CVPR 2024).

"Analyzing and Improving the Training Dynamics of Diffusion Models" rebuilds the ADM U-Net
so that every layer preserves the expected magnitude of its activations: weights are
normalised in the forward pass (:class:`MPConv`), the nonlinearity and every sum or
concatenation are rescaled to unit variance (:func:`mp_silu`, :func:`mp_sum`,
:func:`mp_cat`), and there are no biases or normalisation layers apart from a pixel norm.
This module holds those pieces; :mod:`jaxdiff.models.edm2` assembles the network.

Layout: activations are NHWC (EDM2 is NCHW), conv kernels HWIO with logical axes
``("conv_h", "conv_w", "embed", "mlp")``, fully connected kernels ``[in, out]`` with
``("embed", "mlp")``. The conversion from the published PyTorch tensors is a transpose
(see :mod:`jaxdiff.pretrained.edm2`); every formula below is written to match
``training/networks_edm2.py`` of NVlabs/edm2 to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import partitioned

MP_SILU_SCALE = 0.596
"""Root mean square of ``silu(x)`` for ``x ~ N(0, 1)``; EDM2 divides by it (Eq. 81)."""

NORM_EPS = 1e-4
"""The epsilon of EDM2's ``normalize``."""


def normalize(x: jax.Array, axis: int | Sequence[int], eps: float = NORM_EPS) -> jax.Array:
    """Scales ``x`` to unit root-mean-square over ``axis`` (EDM2's ``normalize``).

    Computes ``x / (eps + ||x|| / sqrt(n))`` with ``n`` the number of elements reduced over;
    the norm is taken in float32 whatever the input dtype.

    Args:
      x: Any array.
      axis: Axis or axes to normalise over (for a weight: every axis but the output one).
      eps: Added to the RMS, so all-zero slices stay zero instead of NaN.

    Returns:
      ``x`` rescaled, in its own dtype.
    """
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    count = math.prod(x.shape[a] for a in axes)
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))
    return x / (eps + norm * math.sqrt(1.0 / count)).astype(x.dtype)


def mp_silu(x: jax.Array) -> jax.Array:
    """Magnitude-preserving SiLU, ``silu(x) / 0.596`` (EDM2 Eq. 81): unit RMS for unit RMS input."""
    return nn.silu(x) / MP_SILU_SCALE


def mp_sum(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
    """Magnitude-preserving blend ``lerp(a, b, t) / sqrt((1-t)^2 + t^2)`` (EDM2 Eq. 88)."""
    return (a + t * (b - a)) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
    """Magnitude-preserving channel concatenation (EDM2 Eq. 103), channels last.

    ``t`` balances the two inputs' contributions (0: only ``a`` matters, 1: only ``b``),
    independently of their channel counts.
    """
    na, nb = a.shape[-1], b.shape[-1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return jnp.concatenate([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], -1)


def resample(x: jax.Array, filt: Sequence[float], mode: str) -> jax.Array:
    """Separable 2x down/upsampling with a normalised FIR filter, per channel (NHWC).

    ``"down"`` is a stride-2 depthwise convolution with ``outer(f, f) / sum(f)^2``;
    ``"up"`` is the matching transposed convolution with the filter times 4 (so
    ``[1, 1]`` gives 2x2 average pooling and nearest-neighbour upsampling).

    Args:
      x: ``[B, H, W, C]``.
      filt: 1-D filter taps (even length; EDM2 uses ``[1, 1]``).
      mode: ``"keep"``, ``"down"`` or ``"up"``.

    Returns:
      The resampled array.

    Raises:
      ValueError: For an unknown mode or an odd-length filter.
    """
    if mode == "keep":
        return x
    f = np.asarray(filt, np.float64)
    if f.ndim != 1 or len(f) % 2:
        raise ValueError(f"resample_filter {list(filt)} must be 1-D with an even length")
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    kernel = np.outer(f, f)
    c = x.shape[-1]
    dims = ("NHWC", "HWIO", "NHWC")
    if mode == "down":
        k = np.broadcast_to(kernel[:, :, None, None], kernel.shape + (1, c))
        return jax.lax.conv_general_dilated(
            x, jnp.asarray(k, x.dtype), (2, 2), [(pad, pad)] * 2,
            dimension_numbers=dims, feature_group_count=c,
        )  # fmt: skip
    if mode != "up":
        raise ValueError(f"unknown resample mode {mode!r}; allowed: 'keep', 'down', 'up'")
    # A transposed conv is a conv of the 2x-dilated input with the flipped kernel.
    k = (kernel * 4)[::-1, ::-1]
    k = np.broadcast_to(k[:, :, None, None], k.shape + (1, c))
    edge = len(f) - 1 - pad
    return jax.lax.conv_general_dilated(
        x, jnp.asarray(k, x.dtype), (1, 1), [(edge, edge)] * 2, lhs_dilation=(2, 2),
        dimension_numbers=dims, feature_group_count=c,
    )  # fmt: skip


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features ``sqrt(2) cos(x f + phi)`` (EDM2 Eq. 75).

    The frequencies ``f ~ 2 pi N(0, bandwidth^2)`` and phases ``phi ~ 2 pi U(0, 1)`` are
    drawn once and never trained; in PyTorch they are buffers. Here they are ``params``
    (so a published network loads exactly and every jaxdiff code path that carries
    ``{"params": ...}`` carries them), read through ``stop_gradient``: their gradient is
    exactly zero, so Adam leaves them unchanged. Exclude them from weight decay with
    :func:`jaxdiff.models.edm2.trainable_mask`.

    Attributes:
      num_channels: Number of features.
      bandwidth: Frequency scale.
    """

    num_channels: int
    bandwidth: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[B]`` scalars to ``[B, num_channels]`` float32 features."""
        scale = 2 * np.pi * self.bandwidth

        def init_freqs(key, shape, dtype=jnp.float32):
            return scale * jax.random.normal(key, shape, dtype)

        def init_phases(key, shape, dtype=jnp.float32):
            return 2 * np.pi * jax.random.uniform(key, shape, dtype)

        freqs = self.param("freqs", partitioned(init_freqs, (None,)), (self.num_channels,))
        phases = self.param("phases", partitioned(init_phases, (None,)), (self.num_channels,))
        freqs, phases = jax.lax.stop_gradient((freqs, phases))
        y = x.astype(jnp.float32)[:, None] * freqs[None, :] + phases[None, :]
        return jnp.cos(y) * math.sqrt(2)


class MPConv(nn.Module):
    """Magnitude-preserving convolution or fully connected layer (EDM2 Eq. 47).

    The stored weight ``w`` (one slice per output channel) is normalised in every forward
    pass, ``w_o / ||w_o||`` up to EDM2's epsilon, then scaled by ``gain / sqrt(fan_in)``,
    so the layer's output has the magnitude of its input times ``gain`` whatever the
    stored weight's norm. EDM2 also *forces* the stored weights back to unit norm during
    training; in JAX that is the projection :func:`jaxdiff.models.edm2.force_weight_norm`
    applied after each optimizer update. No bias.

    Attributes:
      features: Output channels.
      kernel: ``()`` for a fully connected layer, ``(k, k)`` for a convolution (odd k,
        "same" padding).
      dtype: Compute dtype (the normalisation runs in float32).
      param_dtype: Parameter dtype.
    """

    features: int
    kernel: tuple[int, ...] = ()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, gain: float | jax.Array = 1.0) -> jax.Array:
        """Applies the layer to ``[..., in]`` (dense) or ``[B, H, W, in]`` (conv) inputs."""
        kernel = tuple(self.kernel)
        shape = kernel + (x.shape[-1], self.features)
        names = ("conv_h", "conv_w", "embed", "mlp") if kernel else ("embed", "mlp")
        # EDM2 draws each weight from N(0, 1); the forward pass normalises it anyway.
        init = nn.initializers.normal(1.0)
        w = self.param("weight", partitioned(init, names), shape, self.param_dtype)
        w = normalize(w.astype(jnp.float32), tuple(range(w.ndim - 1)))
        w = w * (gain / math.sqrt(math.prod(shape[:-1])))
        w = w.astype(self.dtype)
        x = x.astype(self.dtype)
        if not kernel:
            return x @ w
        pad = [(k // 2, k // 2) for k in kernel]
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )


class Block(nn.Module):
    """EDM2 encoder/decoder block with optional self-attention (EDM2 Fig. 21).

    ``perturb`` (static) implements the attention perturbations of guidance methods:
    ``"pag"`` replaces the attention map by the identity (each pixel attends to itself,
    output = its value vector), ``"slg"`` skips the attention branch.

    Attributes:
      features: Output channels.
      flavor: ``"enc"`` (1x1 skip conv and pixel norm before the residual branch) or
        ``"dec"`` (skip conv after it).
      resample_mode: ``"keep"``, ``"up"`` or ``"down"``.
      resample_filter: FIR taps of the resampling.
      attention: Whether the block has self-attention (when ``features`` holds at least
        one head of ``channels_per_head``).
      channels_per_head: Channels per attention head.
      dropout: Dropout rate in the residual branch (``deterministic=False`` only).
      res_balance: Blend of main (0) and residual (1) branch.
      attn_balance: Blend of main (0) and attention (1) branch.
      clip_act: Clip output activations to ``[-clip_act, clip_act]`` (None = no clip).
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    features: int
    flavor: str = "enc"
    resample_mode: str = "keep"
    resample_filter: tuple[float, ...] = (1, 1)
    attention: bool = False
    channels_per_head: int = 64
    dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def num_heads(self) -> int:
        """Attention heads (0 = no attention), as EDM2 counts them."""
        return self.features // self.channels_per_head if self.attention else 0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        emb: jax.Array,
        deterministic: bool = True,
        perturb: str | None = None,
    ) -> jax.Array:
        """Applies the block.

        Args:
          x: ``[B, H, W, C_in]``.
          emb: ``[B, E]`` embedding (already through ``mp_silu``).
          deterministic: Disables dropout.
          perturb: Static: None, ``"pag"`` or ``"slg"`` (see the class docstring).

        Returns:
          ``[B, H', W', features]``.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c_out = self.features
        emb_gain = self.param("emb_gain", partitioned(nn.initializers.zeros_init(), ()), ())
        x = resample(x.astype(self.dtype), self.resample_filter, self.resample_mode)
        has_skip = x.shape[-1] != c_out
        if self.flavor == "enc":
            if has_skip:
                x = MPConv(c_out, (1, 1), name="conv_skip", **kw)(x)
            x = normalize(x, -1)  # pixel norm

        y = MPConv(c_out, (3, 3), name="conv_res0", **kw)(mp_silu(x))
        c = MPConv(c_out, (), name="emb_linear", **kw)(emb, gain=emb_gain) + 1
        y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
        if self.dropout:
            y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
        y = MPConv(c_out, (3, 3), name="conv_res1", **kw)(y)

        if self.flavor == "dec" and has_skip:
            x = MPConv(c_out, (1, 1), name="conv_skip", **kw)(x)
        x = mp_sum(x, y, t=self.res_balance)

        heads = self.num_heads
        if heads and (perturb != "slg" or self.is_initializing()):
            b, h, w, _ = x.shape
            qkv = MPConv(3 * c_out, (1, 1), name="attn_qkv", **kw)(x)
            # EDM2's channel order is (head, channel, q/k/v), q/k/v fastest.
            qkv = normalize(qkv.reshape(b, h * w, heads, -1, 3), 3)  # pixel norm per head
            q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]  # [B, T, N, C/N]
            if perturb == "pag":
                y = v  # identity attention map
            else:
                logits = jnp.einsum("bqnc,bknc->bnqk", q, k / math.sqrt(q.shape[-1]))
                weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
                y = jnp.einsum("bnqk,bknc->bqnc", weights, v)
            y = MPConv(c_out, (1, 1), name="attn_proj", **kw)(y.reshape(b, h, w, c_out))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = jnp.clip(x, -self.clip_act, self.clip_act)
        return x
