"""Layers shared by the jaxdiff networks: dense/norm helpers, noise and class embeddings.

Self-attention lives in :mod:`jaxdiff.models.attention`.

Every parameter is created through :func:`flax.linen.with_logical_partitioning`, so
``nn.get_partition_spec(variables)`` names each axis with a word from
:data:`LOGICAL_AXES`. Parallel code maps those names onto mesh axes
(``nn.logical_to_mesh_sharding``); models never mention a mesh. Conventions:

* dense kernels ``("embed", "mlp")`` when they widen, ``("mlp", "embed")`` when they
  narrow; the bias takes the name of the output axis;
* attention ``q/k/v`` kernels ``("embed", None, "heads", "kv")`` (the ``None`` axis is
  the 3-way q/k/v split), output kernel ``("heads", "kv", "embed")``;
* 2-D conv kernels ``("conv_h", "conv_w", "embed", "mlp")``, bias ``("mlp",)``;
* norm scales and biases ``("norm",)``; class table ``("vocab", "embed")``;
  patch embedding ``("patch", "embed")``;
* params stacked by ``nn.scan`` (DiT's ``scan_blocks``) carry a leading ``"layers"``
  axis, which the default rules never shard.

Params are wrapped in :class:`flax.linen.Partitioned` boxes; ``nn.unbox`` /
``flax.linen.meta.unbox`` strips them (``Module.apply`` accepts either form).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LOGICAL_AXES: tuple[str, ...] = (
    "embed",
    "mlp",
    "heads",
    "kv",
    "vocab",
    "conv_h",
    "conv_w",
    "norm",
    "patch",
    "layers",
)
"""Logical axis names used by every jaxdiff model parameter."""

VARIANTS: tuple[str | None, ...] = (None, "pag", "slg")
"""Values accepted by every model's static ``variant`` argument."""

TOKEN_VARIANTS: tuple[str | None, ...] = VARIANTS + ("negtome",)
"""Values accepted by token models (the DiT): :data:`VARIANTS` plus ``"negtome"``
(negative token merging after attention), which needs image tokens to merge."""

UNET_VARIANTS: tuple[str | None, ...] = VARIANTS + ("inject",)
"""Values accepted by the UNet: :data:`VARIANTS` plus ``"inject"`` (every attention layer
takes another example's attention probabilities, ``attn_donor=``; editing)."""

EMBEDDINGS: tuple[str, ...] = ("positional", "fourier")
"""Kinds of noise-level embedding."""

DEFAULT_EMBEDDING_SCALE: dict[str, float] = {"positional": 1000.0, "fourier": 16.0}
"""Default input scale per embedding kind (see :class:`NoiseEmbedding`)."""

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def partitioned(init: nn.initializers.Initializer, names: Sequence[str | None]):
    """Wraps an initializer so its parameter carries logical axis names.

    Args:
      init: A Flax/JAX initializer ``(key, shape, dtype) -> Array``.
      names: One logical axis name (or None) per parameter dimension.

    Returns:
      An initializer producing a :class:`flax.linen.Partitioned` box.
    """
    return nn.with_logical_partitioning(init, tuple(names))


def check_variant(variant: str | None, allowed: Sequence[str | None] = VARIANTS) -> None:
    """Raises ValueError unless ``variant`` is one of ``allowed``.

    Args:
      variant: The requested network variant.
      allowed: Accepted values.

    Raises:
      ValueError: Naming the bad value and the allowed ones.
    """
    if variant not in allowed:
        hint = ""
        if variant in TOKEN_VARIANTS:
            hint = f"; {variant!r} needs a token model (the DiT)"
        raise ValueError(f"unknown variant {variant!r}; allowed: {tuple(allowed)}{hint}")


def dense(
    features: int,
    names: tuple[str, str],
    *,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    kernel_init: nn.initializers.Initializer = xavier,
    use_bias: bool = True,
    name: str | None = None,
) -> nn.Dense:
    """A Dense layer whose kernel and bias carry logical axis names.

    Args:
      features: Output width.
      names: Logical names of the kernel's (input, output) axes.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
      kernel_init: Kernel initializer (Xavier-uniform by default, as in DiT).
      use_bias: Whether to add a bias (initialised to zero).
      name: Submodule name.

    Returns:
      The configured :class:`flax.linen.Dense`.
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(kernel_init, names),
        bias_init=partitioned(zeros, names[1:]),
        name=name,
    )


def group_norm(channels: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, name=None):
    """GroupNorm with ``min(32, channels)``-ish groups and named scale/bias.

    The group count is the largest divisor of ``channels`` that is at most 32, so
    narrow test models (e.g. 12 channels) still normalise.

    Args:
      channels: Number of channels of the input.
      dtype: Compute dtype (statistics are taken in float32 by Flax).
      param_dtype: Parameter dtype.
      name: Submodule name.

    Returns:
      The configured :class:`flax.linen.GroupNorm`.
    """
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(ones, ("norm",)),
        bias_init=partitioned(zeros, ("norm",)),
        name=name,
    )


def sinusoidal_features(x: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Transformer-style sinusoidal features of a scalar per example.

    Args:
      x: Values, shape ``[B]``.
      dim: Even number of output features.
      max_period: Longest period; frequencies are geometric from 1 to ``1/max_period``.

    Returns:
      ``[B, dim]`` float32 array ``[cos(x f), sin(x f)]``.
    """
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half)
    args = x.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def fourier_features(x: jax.Array, dim: int, scale: float, seed: int = 0) -> jax.Array:
    """Random Fourier features with a fixed (not learned) frequency bank.

    The frequencies ``~ N(0, scale^2)`` come from a fixed seed, so they are a constant of
    the architecture rather than a parameter: nothing to train, checkpoint or shard.

    Args:
      x: Values, shape ``[B]``.
      dim: Even number of output features.
      scale: Standard deviation of the frequencies (EDM uses 16).
      seed: Seed of the frequency bank.

    Returns:
      ``[B, dim]`` float32 array ``[cos(2 pi x f), sin(2 pi x f)]``.
    """
    freqs = np.random.default_rng(seed).standard_normal(dim // 2).astype(np.float32) * scale
    args = 2 * np.pi * x.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class NoiseEmbedding(nn.Module):
    """Embeds the noise label (the formulation's ``c_noise``) into a vector.

    The label may be ``log(sigma)/4`` (EDM, roughly [-2, 2]) or ``t`` in [0, 1]
    (VP / flow), so its range is small. Both kinds first multiply it by ``scale``:

    * ``"positional"``: sinusoids of ``scale * label`` (default scale 1000, the
      DDPM/ADM convention for t in [0, 1]); geometric frequencies down to 1/10000 keep
      distinct labels distinct over [-10, 10] without aliasing.
    * ``"fourier"``: random Fourier features with frequency std ``scale`` (default 16,
      the EDM/NCSN++ choice).

    The features then pass through ``Dense(out) -> SiLU -> Dense(out)``.

    Attributes:
      features: Number of sinusoidal/Fourier features (even).
      out_features: Width of the returned embedding.
      kind: ``"positional"`` or ``"fourier"``.
      scale: Input scale; None picks :data:`DEFAULT_EMBEDDING_SCALE` for ``kind``.
      dtype: Compute dtype of the MLP.
      param_dtype: Parameter dtype.
      fourier_seed: Seed of the fixed Fourier frequency bank.
      zero_init_output: Start the last layer at zero (the embedding is then exactly 0
        at initialisation; see :class:`jaxdiff.models.aux_time.AuxEmbedding`).
    """

    features: int
    out_features: int
    kind: str = "positional"
    scale: float | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    fourier_seed: int = 0
    zero_init_output: bool = False

    @nn.compact
    def __call__(self, noise_label: jax.Array) -> jax.Array:
        """Embeds a batch of noise labels.

        Args:
          noise_label: ``[B]`` (or scalar, broadcast to ``[1]``) float labels.

        Returns:
          ``[B, out_features]`` embedding in ``dtype``.

        Raises:
          ValueError: If ``kind`` is unknown.
        """
        if self.kind not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {self.kind!r}; allowed: {EMBEDDINGS}")
        scale = DEFAULT_EMBEDDING_SCALE[self.kind] if self.scale is None else self.scale
        label = jnp.atleast_1d(noise_label)
        if self.kind == "positional":
            h = sinusoidal_features(label * scale, self.features)
        else:
            h = fourier_features(label, self.features, scale, seed=self.fourier_seed)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.out_features, ("embed", "mlp"), name="fc1", **kw)(h.astype(self.dtype))
        h = nn.silu(h)
        out_kw = {"kernel_init": zeros} if self.zero_init_output else {}
        return dense(self.out_features, ("mlp", "embed"), name="fc2", **kw, **out_kw)(h)


CEP_NOISES: tuple[str, ...] = ("gaussian", "uniform")
"""Distributions of the condition-embedding perturbation (see :class:`ClassEmbedding`)."""


def check_cep(scale: float, noise: str) -> None:
    """Raises ValueError unless ``scale >= 0`` and ``noise`` is one of :data:`CEP_NOISES`."""
    if noise not in CEP_NOISES:
        raise ValueError(f"unknown cep_noise {noise!r}; allowed: {CEP_NOISES}")
    if scale < 0:
        raise ValueError(f"cep_scale={scale} must be >= 0 (0 = no perturbation)")


def cep_perturbation(key: jax.Array, shape: tuple[int, ...], scale: float, noise: str) -> jax.Array:
    """CEP's perturbation of ``[..., d]`` condition embeddings (Chen et al. 2024).

    ``gaussian``: ``(scale / sqrt(d)) * N(0, I)``; ``uniform``: ``U(-scale / sqrt(d),
    scale / sqrt(d))`` per entry (variance ``scale^2 / (3 d)``). ``scale`` is the paper's
    gamma; dividing by ``sqrt(d)`` keeps the perturbation's norm about ``scale``
    whatever the embedding width.

    Args:
      key: PRNG key.
      shape: Shape of the embeddings; the last axis is ``d``.
      scale: gamma (>= 0).
      noise: ``"gaussian"`` or ``"uniform"``.

    Returns:
      float32 perturbation of ``shape``.

    Raises:
      ValueError: For an unknown ``noise`` or a negative ``scale``.
    """
    check_cep(scale, noise)
    bound = scale / math.sqrt(shape[-1])
    if noise == "gaussian":
        return bound * jax.random.normal(key, shape, jnp.float32)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class ClassEmbedding(nn.Module):
    """Class-label embedding with an extra *null* class for classifier-free guidance.

    The table has ``num_classes + 1`` rows; id ``num_classes`` is the null class. A
    ``cond`` of None means "unconditional" and selects the null class for every
    example. Labels are not range-checked (impossible under jit): following
    ``jnp.take``, a label above ``num_classes`` yields a NaN embedding (a loud
    failure) and a negative label wraps around Python-style (-1 is the null class).

    Condition-embedding perturbation (CEP, Chen et al. 2024, "Slight Corruption in
    Pre-training Data Makes Better Diffusion Models"): with ``cep_scale > 0`` and
    ``train=True`` every looked-up embedding (the null class's too) gets
    :func:`cep_perturbation` added, drawn from the ``"dropout"`` rng stream. Sampling
    (``train=False``) never perturbs, and ``cep_scale=0`` draws nothing at all.

    Attributes:
      num_classes: Number of real classes (> 0).
      features: Embedding width.
      cep_scale: CEP's gamma (0 = off).
      cep_noise: CEP's distribution, ``"gaussian"`` or ``"uniform"``.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    num_classes: int
    features: int
    cep_scale: float = 0.0
    cep_noise: str = "gaussian"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, cond: jax.Array | None, batch: int, train: bool = False) -> jax.Array:
        """Looks up class embeddings.

        Args:
          cond: int ``[B]`` labels, or None for the null class.
          batch: Batch size, used when ``cond`` is None.
          train: Training pass: apply CEP (needs the ``"dropout"`` rng when on).

        Returns:
          ``[B, features]`` embedding in ``dtype``.
        """
        check_cep(self.cep_scale, self.cep_noise)
        if cond is None:
            cond = jnp.full((batch,), self.num_classes, jnp.int32)
        table = nn.Embed(
            self.num_classes + 1,
            self.features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="table",
        )
        emb = table(jnp.asarray(cond, jnp.int32))
        if train and self.cep_scale > 0:
            delta = cep_perturbation(
                self.make_rng("dropout"), emb.shape, self.cep_scale, self.cep_noise
            )
            emb = (emb.astype(jnp.float32) + delta).astype(emb.dtype)
        return emb
