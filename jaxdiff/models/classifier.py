"""A small conv classifier for 8x8 digits: FD-digits features, and (noisy) classifier guidance.

Two uses, one module:

* **Clean feature network** (``noise_conditioned=False``): trained on clean digits, its
  penultimate activations (:meth:`Classifier.features`, ``[B, feature_dim]``) are the feature
  space of FD-digits and digit precision/recall, and its logits give the class accuracy
  of class-conditional samples (see :mod:`jaxdiff.metrics.fd_digits`).
* **Noise-aware classifier** (``noise_conditioned=True``): also takes the noise label of a
  noisy input (EDM's ``c_noise = log(sigma) / 4``), added to every conv stage through a
  learned per-channel shift, so it can classify ``x0 + sigma * n`` at any noise level:
  the ``p(y | x_sigma)`` that classifier guidance differentiates.

Architecture: ``[conv3x3 -> GroupNorm -> SiLU] x2 -> avgpool2`` per stage (default widths
16, 32: 8x8 -> 4x4 -> 2x2), flatten, ``Dense(feature_dim) -> SiLU`` = features, then
``Dense(num_classes)`` = logits. Parameters carry logical axis names like the other models
(conv kernels ``("conv_h", "conv_w", "embed", "mlp")``).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import NoiseEmbedding, dense, group_norm
from jaxdiff.models.unet import conv


class Classifier(nn.Module):
    """Conv classifier ``x [B, H, W, C] -> logits [B, num_classes]``.

    Attributes:
      num_classes: Number of classes.
      channels: Conv widths per stage; each stage halves the resolution.
      feature_dim: Width of the penultimate feature layer.
      noise_conditioned: Take a noise label (noise-aware classifier for guidance).
      dropout: Dropout rate before the logits (only with ``train=True``).
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    num_classes: int = 10
    channels: Sequence[int] = (16, 32)
    feature_dim: int = 128
    noise_conditioned: bool = False
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        """Creates the layers (shared by :meth:`__call__` and :meth:`features`)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        convs, norms = [], []
        for i, ch in enumerate(self.channels):
            for j in range(2):
                convs.append(conv(ch, 3, name=f"conv{i}_{j}", **kw))
                norms.append(group_norm(ch, name=f"norm{i}_{j}", **kw))
        self.convs, self.norms = convs, norms
        if self.noise_conditioned:
            self.noise_embed = NoiseEmbedding(
                64, self.feature_dim, "positional", name="noise_embed", **kw
            )
            self.noise_shift = [
                dense(ch, ("embed", "mlp"), name=f"noise_shift{i}", **kw)
                for i, ch in enumerate(self.channels)
            ]
        self.fc = dense(self.feature_dim, ("embed", "mlp"), name="fc", **kw)
        self.head = dense(self.num_classes, ("mlp", "vocab"), name="head", **kw)
        self.drop = nn.Dropout(self.dropout)

    def features(self, x: jax.Array, noise_label: jax.Array | None = None) -> jax.Array:
        """Penultimate features (after the SiLU), the FD-digits feature space.

        Args:
          x: ``[B, H, W, C]`` images in [-1, 1] (or, noise-aware, ``c_in``-scaled noisy
            images); H and W divisible by ``2 ** len(channels)``.
          noise_label: ``[B]`` (or scalar) noise labels; required iff
            ``noise_conditioned``.

        Returns:
          ``[B, feature_dim]`` float32.

        Raises:
          ValueError: If ``noise_label`` is given to a clean classifier or missing for a
            noise-aware one.
        """
        h = self._stages(x, noise_label, len(self.channels))
        h = nn.silu(self.fc(h.reshape(x.shape[0], -1)))
        return h.astype(jnp.float32)

    def feature_map(
        self, x: jax.Array, stage: int = 1, noise_label: jax.Array | None = None
    ) -> jax.Array:
        """The spatial activation of conv stage ``stage`` ("patch features", e.g. for REPA).

        The map after the stage's two ``conv -> GroupNorm -> SiLU`` layers, before its
        pooling: ``[B, H / 2^stage, W / 2^stage, channels[stage]]`` (stage 1 of the default
        digits classifier: ``[B, 4, 4, 32]``).

        Args:
          x: Images, see :meth:`features`.
          stage: Index into ``channels``.
          noise_label: Noise labels, see :meth:`features`.

        Returns:
          float32 feature map.

        Raises:
          ValueError: For a stage out of range (or a bad ``noise_label``).
        """
        if not 0 <= stage < len(self.channels):
            raise ValueError(
                f"stage={stage} out of range: the classifier has stages 0..{len(self.channels) - 1}"
            )
        return self._stages(x, noise_label, stage, pool_last=False).astype(jnp.float32)

    def _stages(
        self, x: jax.Array, noise_label: jax.Array | None, last: int, pool_last: bool = True
    ) -> jax.Array:
        """Runs conv stages ``0..last`` (all pooled, except ``last`` if ``pool_last`` is off)."""
        if self.noise_conditioned != (noise_label is not None):
            raise ValueError(
                "noise_label is required for a noise-conditioned Classifier and must be "
                f"None otherwise (noise_conditioned={self.noise_conditioned})"
            )
        b = x.shape[0]
        emb = None
        if noise_label is not None:
            emb = nn.silu(self.noise_embed(jnp.broadcast_to(noise_label, (b,))))
        h = x.astype(self.dtype)
        for i in range(min(last + 1, len(self.channels))):
            for j in range(2):
                k = 2 * i + j
                h = self.norms[k](self.convs[k](h))
                if emb is not None and j == 0:
                    h = h + self.noise_shift[i](emb)[:, None, None, :]
                h = nn.silu(h)
            if i < last or pool_last:
                h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        return h

    def __call__(
        self, x: jax.Array, noise_label: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        """Class logits.

        Args:
          x: Images, see :meth:`features`.
          noise_label: Noise labels, see :meth:`features`.
          train: Enables dropout (rng collection ``"dropout"``).

        Returns:
          ``[B, num_classes]`` float32 logits.
        """
        h = self.drop(self.features(x, noise_label).astype(self.dtype), deterministic=not train)
        return self.head(h).astype(jnp.float32)
