"""Residual MLP denoiser backbone for low-dimensional (e.g. 2-D toy) data.

``x [B, D]`` -> Dense(width) -> ``depth`` residual blocks -> SiLU -> Dense(D). Each
block computes ``h + Dense(dropout(SiLU(Dense(SiLU(h)) + Dense(emb))))``, where ``emb``
is the sum of the noise-level and class embeddings. The output layer is zero-initialised
by default so the network starts at zero. Logical axes follow
:mod:`jaxdiff.models.layers`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import (
    ClassEmbedding,
    NoiseEmbedding,
    check_variant,
    dense,
    xavier,
    zeros,
)


class MLP(nn.Module):
    """Residual MLP on ``[B, D]`` inputs.

    ``variant`` (static): None is the normal network; ``"slg"`` skips (makes identity)
    the residual blocks listed in ``skip_layers``. ``"pag"`` raises ValueError: the MLP
    has no attention to perturb.

    Attributes:
      features: Hidden width.
      depth: Number of residual blocks.
      num_classes: Real classes (0 = unconditional); id ``num_classes`` is the null
        class, used for every example when ``cond`` is None.
      embedding: Noise embedding kind, ``"positional"`` or ``"fourier"``.
      embedding_scale: Scale of the noise embedding (None = kind's default).
      frequency_features: Sinusoidal/Fourier features of the noise embedding.
      dropout: Dropout rate inside blocks (active only with ``train=True``).
      zero_init_output: Zero-initialise the output layer (output 0 at init).
      skip_layers: Blocks skipped by ``"slg"``; None = the middle block.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    features: int = 128
    depth: int = 3
    num_classes: int = 0
    embedding: str = "positional"
    embedding_scale: float | None = None
    frequency_features: int = 64
    dropout: float = 0.0
    zero_init_output: bool = True
    skip_layers: tuple[int, ...] | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        noise_label: jax.Array,
        cond: jax.Array | None = None,
        *,
        train: bool = False,
        variant: str | None = None,
    ) -> jax.Array:
        """Predicts the network output for noisy vectors.

        Args:
          x: ``[B, D]`` noisy samples.
          noise_label: ``[B]`` float noise labels (the formulation's ``c_noise``).
          cond: int32 ``[B]`` class labels or None (null class).
          train: Enables dropout (rng collection ``"dropout"``).
          variant: Static: None or ``"slg"``.

        Returns:
          ``[B, D]`` float32.

        Raises:
          ValueError: Unknown/unsupported variant or out-of-range ``skip_layers``.
        """
        check_variant(variant)
        if variant == "pag":
            raise ValueError("variant 'pag' needs attention layers; MLP supports None, 'slg'")
        skip: frozenset[int] = frozenset()
        if variant == "slg":
            chosen = (self.depth // 2,) if self.skip_layers is None else self.skip_layers
            if any(not -self.depth <= i < self.depth for i in chosen):
                raise ValueError(f"skip_layers {chosen} out of range for depth {self.depth}")
            skip = frozenset(i % self.depth for i in chosen)
        b, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        emb = NoiseEmbedding(
            self.frequency_features,
            self.features,
            self.embedding,
            self.embedding_scale,
            name="noise_embed",
            **kw,
        )(jnp.broadcast_to(noise_label, (b,)))
        if self.num_classes > 0:
            emb = emb + ClassEmbedding(self.num_classes, self.features, name="class_embed", **kw)(
                cond, b
            )
        emb = nn.silu(emb)

        h = dense(self.features, ("embed", "mlp"), name="fc_in", **kw)(x.astype(self.dtype))
        for i in range(self.depth):
            if i in skip and not self.is_initializing():
                continue  # skip-layer guidance: the block is the identity
            r = dense(self.features, ("embed", "mlp"), name=f"block{i}_fc1", **kw)(nn.silu(h))
            r = r + dense(self.features, ("embed", "mlp"), name=f"block{i}_emb", **kw)(emb)
            r = nn.Dropout(self.dropout)(nn.silu(r), deterministic=not train)
            h = h + dense(self.features, ("mlp", "embed"), name=f"block{i}_fc2", **kw)(r)

        out_init = zeros if self.zero_init_output else xavier
        out = dense(d, ("mlp", "embed"), kernel_init=out_init, name="fc_out", **kw)(nn.silu(h))
        return out.astype(jnp.float32)
