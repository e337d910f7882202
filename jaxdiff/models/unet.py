"""Convolutional U-Net of the DDPM++ / ADM family.

Structure (for ``ch_mult`` of length L on ``[B, H, W, C]`` inputs):

* input 3x3 conv to ``ch`` channels;
* encoder: per level ``num_res_blocks`` residual blocks of ``ch * mult`` channels,
  each followed by self-attention when the level's resolution (pixels, ``H / 2^level``)
  is in ``attn_resolutions``; then a downsample (strided 3x3 conv or 2x2 average pool)
  except at the last level;
* middle: residual block, self-attention, residual block;
* decoder: mirror image with ``num_res_blocks + 1`` blocks per level, each fed the
  concatenation with the matching encoder activation (skip connection), then a
  nearest-neighbour upsample + 3x3 conv;
* GroupNorm -> SiLU -> zero-initialised 3x3 conv back to ``C`` channels, so the
  network outputs exactly zero at initialisation.

Residual blocks: GroupNorm -> SiLU -> conv -> GroupNorm modulated by the embedding
(adaptive scale/shift, ADM's ``use_scale_shift_norm``) -> SiLU -> dropout ->
zero-initialised conv; the sum with the (1x1-projected) input is scaled by 1/sqrt(2)
(DDPM++) to keep activations' variance from growing with depth. The conditioning
embedding (width ``4 * ch``) is the sum of the noise-level and class embeddings, plus,
with ``augment_dim > 0``, a bias-free linear map of the augmentation labels and, with
``aux_time_embed``, the embedding of a second scalar per sample
(:class:`~jaxdiff.models.aux_time.AuxEmbedding`).

Logical axes follow :mod:`jaxdiff.models.layers`: conv kernels are
``("conv_h", "conv_w", "embed", "mlp")`` whatever the in/out widths.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.attention import SelfAttention
from jaxdiff.models.aux_time import aux_time_embedding
from jaxdiff.models.layers import (
    UNET_VARIANTS,
    ClassEmbedding,
    NoiseEmbedding,
    check_variant,
    dense,
    group_norm,
    partitioned,
    xavier,
    zeros,
)
from jaxdiff.models.remat import maybe_remat
from jaxdiff.models.repa import check_repa_fields, repa_project

RESAMPLES: tuple[str, ...] = ("conv", "avgpool")
"""Downsampling kinds of :class:`UNet`."""


def conv(
    features: int,
    kernel: int = 3,
    *,
    stride: int = 1,
    zero_init: bool = False,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    name: str | None = None,
) -> nn.Conv:
    """A square 2-D convolution with symmetric padding and named axes.

    Args:
      features: Output channels.
      kernel: Kernel side (odd).
      stride: Stride in both directions.
      zero_init: Initialise the kernel to zero.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
      name: Submodule name.

    Returns:
      The configured :class:`flax.linen.Conv`.
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(
            zeros if zero_init else xavier, ("conv_h", "conv_w", "embed", "mlp")
        ),
        bias_init=partitioned(zeros, ("mlp",)),
        name=name,
    )


class ResBlock(nn.Module):
    """Residual block with adaptive GroupNorm scale/shift from the embedding.

    Attributes:
      features: Output channels.
      dropout: Dropout rate before the second conv.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    features: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, deterministic: bool = True) -> jax.Array:
        """Applies the block.

        Args:
          x: ``[B, H, W, C_in]``.
          emb: ``[B, E]`` conditioning embedding.
          deterministic: Disables dropout.

        Returns:
          ``[B, H, W, features]``.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(x.shape[-1], name="norm1", **kw)(x))
        h = conv(self.features, name="conv1", **kw)(h)
        mod = dense(2 * self.features, ("embed", "mlp"), name="emb", **kw)(nn.silu(emb))
        scale, shift = jnp.split(mod[:, None, None, :], 2, axis=-1)
        h = group_norm(self.features, name="norm2", **kw)(h) * (1 + scale) + shift
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
        h = conv(self.features, zero_init=True, name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, name="skip", **kw)(x)
        return (x + h) * (1 / math.sqrt(2))


class AttnBlock(nn.Module):
    """Residual self-attention over the pixels of a feature map.

    Attributes:
      num_heads: Attention heads.
      attention_impl: ``implementation=`` of ``jax.nn.dot_product_attention``.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    num_heads: int
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, identity: bool = False, donor: jax.Array | None = None
    ) -> jax.Array:
        """Applies the block.

        Args:
          x: ``[B, H, W, C]``.
          identity: Static; identity attention map (perturbed-attention guidance).
          donor: int ``[B]`` or None: example ``i`` takes example ``donor[i]``'s attention
            probabilities (see :class:`~jaxdiff.models.attention.SelfAttention`).

        Returns:
          ``[B, H, W, C]``.
        """
        b, height, width, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(c, name="norm", **kw)(x).reshape(b, height * width, c)
        h = SelfAttention(
            self.num_heads, self.attention_impl, zero_init_out=True, name="attn", **kw
        )(h, identity, donor)
        return x + h.reshape(b, height, width, c)


class UNet(nn.Module):
    """DDPM++/ADM-style U-Net denoiser backbone on ``[B, H, W, C]`` images.

    Attention layers are addressed by resolution in pixels (an int from
    ``attn_resolutions``, meaning every attention layer at that resolution) or
    ``"mid"`` (the middle block's attention). ``variant`` (static) perturbs them:

    * None: the normal network;
    * ``"pag"``: the attention layers in ``pag_layers`` use the identity attention map
      (output = value projection, then the output projection);
    * ``"slg"``: the attention layers in ``skip_layers`` are skipped (identity);
    * ``"inject"``: every attention layer of example ``i`` uses the attention
      probabilities of example ``attn_donor[i]`` over its own values (Prompt-to-Prompt's
      self-attention replacement, for editing: the target branch takes the source's).

    Intermediate features (for discriminator heads) are sown into the ``"intermediates"``
    collection only when it is mutable: ``enc{level}`` (the last activation of each
    encoder level, before downsampling, ``[B, H / 2^level, W / 2^level, ch * mult]``) and
    ``mid`` (the middle block's output). ``model.apply(v, x, t, c,
    mutable=["intermediates"])`` returns ``(out, {"intermediates": {name: (h,)}})``; a
    plain ``apply`` is unchanged. See :func:`jaxdiff.distill.features.unet_features`.

    Attributes:
      ch: Base channel count.
      ch_mult: Channel multiplier per resolution level.
      num_res_blocks: Residual blocks per encoder level.
      attn_resolutions: Resolutions (pixels) at which self-attention runs.
      dropout: Dropout rate in residual blocks (active only with ``train=True``).
      num_classes: Real classes (0 = unconditional); id ``num_classes`` is the null
        class, used for every example when ``cond`` is None.
      embedding: Noise embedding kind, ``"positional"`` or ``"fourier"``.
      embedding_scale: Scale of the noise embedding (None = kind's default).
      num_heads: Attention heads (used when ``head_dim`` is None).
      head_dim: If set, heads = channels // head_dim at each attention layer.
      resample: Downsampling, ``"conv"`` (strided 3x3 conv) or ``"avgpool"``.
      attention_impl: ``implementation=`` of ``jax.nn.dot_product_attention``.
      pag_layers: Attention layers perturbed by ``"pag"``; None = ``("mid",)``.
      skip_layers: Attention layers skipped by ``"slg"``; None = ``("mid",)``.
      augment_dim: Width of the augmentation labels the network is conditioned on (EDM's
        non-leaking augmentation, :class:`jaxdiff.data.augment.EdmAugment`: 9); 0 = none,
        and no parameter is created.
      aux_time_embed: Condition on a second per-sample scalar, the call's ``aux_time``
        (e.g. MeanFlow's interval ``t - r``, or a guidance scale ``w`` for guidance
        distillation): its embedding (:class:`~jaxdiff.models.aux_time.AuxEmbedding`,
        params ``aux_time_embed``, last layer zero-initialised) joins the noise and class
        embeddings. Off by default: no parameter is created and ``aux_time`` must be None.
      aux_time_scale: Input scale of the ``aux_time`` features (None = the ``embedding``
        kind's default, as for the noise label).
      repa_layer: The activation REPA aligns (:mod:`jaxdiff.models.repa`): ``"enc{level}"``
        or ``"mid"``, the names sown into ``"intermediates"``; used when ``repa_dim > 0``.
      repa_dim: Width of the frozen encoder's features: with ``repa_dim > 0`` a
        ``repa_projector`` MLP maps every pixel of ``repa_layer`` to it in training passes
        (sown as ``"repa"``). 0 (default): no projector, no params.
      repa_hidden: Hidden width of the REPA projector (REPA: 2048).
      cep_scale: Condition-embedding perturbation of the class embedding in training
        passes (CEP's gamma, see :class:`~jaxdiff.models.layers.ClassEmbedding`); 0 = off.
      cep_noise: CEP's distribution, ``"gaussian"`` or ``"uniform"``.
      remat: Rematerialisation policy of every residual and attention block, a name from
        :data:`jaxdiff.models.remat.REMAT_POLICIES`: ``"none"`` (keep all activations:
        fastest, most memory), ``"dots"`` (keep the matmul outputs of the dense layers,
        recompute the memory-bound ops: norms, activations, attention; convolutions are
        not dots, so this saves little here beyond the attention layers) or ``"full"``
        (keep only each block's input and recompute the block: least memory, ~ +33%
        FLOPs per training step). ``True`` / ``False`` mean ``"full"`` / ``"none"``.
        Params and outputs are the same for every policy.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_classes: int = 0
    embedding: str = "positional"
    embedding_scale: float | None = None
    num_heads: int = 1
    head_dim: int | None = None
    resample: str = "conv"
    attention_impl: str | None = None
    pag_layers: tuple[int | str, ...] | None = None
    skip_layers: tuple[int | str, ...] | None = None
    augment_dim: int = 0
    aux_time_embed: bool = False
    aux_time_scale: float | None = None
    repa_layer: str | None = None
    repa_dim: int = 0
    repa_hidden: int = 2048
    cep_scale: float = 0.0
    cep_noise: str = "gaussian"
    remat: str | bool = "none"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _select(self, layers, field: str, resolutions: set[int]) -> frozenset:
        chosen = ("mid",) if layers is None else tuple(layers)
        bad = [k for k in chosen if k != "mid" and k not in resolutions]
        if bad:
            raise ValueError(
                f"{field} {bad} name no attention layer; use 'mid' or one of {sorted(resolutions)}"
            )
        return frozenset(chosen)

    def _augment_embedding(
        self, augment_label: jax.Array | None, batch: int, features: int, kw: dict
    ) -> jax.Array | None:
        """Bias-free linear map of the augmentation labels into the embedding (EDM).

        EDM's SongUNet adds ``map_augment(labels)`` to the noise features *before* its
        mapping MLP; here it joins the class embedding *after* the noise MLP, the point
        where this U-Net already injects conditioning (the noise MLP lives in
        :class:`NoiseEmbedding`). Every residual block still reads the sum through
        ``SiLU -> Dense``, so the labels steer the whole network either way. Without bias,
        zero labels add exactly zero: sampling without labels is the un-augmented model.
        """
        if self.augment_dim < 0:
            raise ValueError(f"augment_dim={self.augment_dim} must be >= 0 (0 = no labels)")
        if self.augment_dim == 0:
            if augment_label is not None:
                raise ValueError(
                    f"got augment_label of shape {jnp.shape(augment_label)} but augment_dim=0: "
                    f"build the UNet with augment_dim={jnp.shape(augment_label)[-1]} to "
                    "condition on the augmentation, or do not augment"
                )
            return None
        if augment_label is None:
            # Created even without labels, so init and sampling see the trained tree.
            augment_label = jnp.zeros((batch, self.augment_dim), self.dtype)
        if jnp.shape(augment_label) != (batch, self.augment_dim):
            raise ValueError(
                f"augment_label has shape {jnp.shape(augment_label)}, expected "
                f"({batch}, augment_dim={self.augment_dim}): match augment_dim to the "
                "augmentation's label_dim"
            )
        mapping = dense(features, (None, "embed"), use_bias=False, name="augment_embed", **kw)
        return mapping(jnp.asarray(augment_label, self.dtype))

    def _capture(self, name: str, h: jax.Array, train: bool) -> None:
        # Sown only when the caller asks: apply(..., mutable=["intermediates"]).
        if not self.is_initializing():
            self.sow("intermediates", name, h)
        if name == self.repa_layer:
            kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
            repa_project(
                self, h, train=train, hidden=self.repa_hidden, features=self.repa_dim, **kw
            )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        noise_label: jax.Array,
        cond: jax.Array | None = None,
        *,
        train: bool = False,
        variant: str | None = None,
        augment_label: jax.Array | None = None,
        aux_time: jax.Array | None = None,
        attn_donor: jax.Array | None = None,
    ) -> jax.Array:
        """Predicts the network output for noisy images.

        Args:
          x: ``[B, H, W, C]`` noisy images; H, W divisible by ``2^(len(ch_mult)-1)``.
          noise_label: ``[B]`` float noise labels (the formulation's ``c_noise``).
          cond: int32 ``[B]`` class labels or None (null class).
          train: Enables dropout (rng collection ``"dropout"``).
          variant: Static: None, ``"pag"``, ``"slg"`` or ``"inject"`` (class docstring).
          augment_label: ``[B, augment_dim]`` float augmentation labels of the training
            batch, or None (sampling): the same as zeros, i.e. "not augmented".
          aux_time: ``[B]`` float second scalar per sample (needs ``aux_time_embed``);
            None = zeros.
          attn_donor: int ``[B]``, needed by (and only by) ``variant="inject"``: the
            example whose attention probabilities each example uses.

        Returns:
          ``[B, H, W, C]`` float32.

        Raises:
          ValueError: Unknown variant/resample, bad layer names or image size, or
            augmentation labels that do not match ``augment_dim``, or ``aux_time``
            without ``aux_time_embed``.
        """
        check_variant(variant, UNET_VARIANTS)
        if (variant == "inject") != (attn_donor is not None):
            raise ValueError(
                f"variant={variant!r} with attn_donor={'None' if attn_donor is None else 'set'}"
                ": pass attn_donor=[B] example indices exactly with variant='inject'"
            )
        if self.resample not in RESAMPLES:
            raise ValueError(f"unknown resample {self.resample!r}; allowed: {RESAMPLES}")
        b, height, width, channels = x.shape
        levels = len(self.ch_mult)
        if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
            raise ValueError(f"image {height}x{width} not divisible by 2^{levels - 1}")
        names = [f"enc{i}" for i in range(levels)] + ["mid"]
        check_repa_fields(self.repa_hidden, self.repa_dim, "repa_layer", self.repa_layer, names)
        attn_res = {height >> i for i in range(levels)} & set(self.attn_resolutions)
        pag = self._select(self.pag_layers, "pag_layers", attn_res) if variant == "pag" else ()
        skip = self._select(self.skip_layers, "skip_layers", attn_res) if variant == "slg" else ()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        deterministic = not train
        # The Python-bool flags (deterministic, identity attention) stay static under remat.
        res_cls = maybe_remat(ResBlock, self.remat, static_argnums=(3,))
        attn_cls = maybe_remat(AttnBlock, self.remat, static_argnums=(2,))

        def attend(h: jax.Array, key: int | str, name: str) -> jax.Array:
            if key in skip and not self.is_initializing():
                return h  # skip-layer guidance: the attention layer is the identity
            c = h.shape[-1]
            heads = self.num_heads if self.head_dim is None else max(1, c // self.head_dim)
            block = attn_cls(heads, self.attention_impl, name=name, **kw)
            return block(h, key in pag, attn_donor)

        emb_dim = 4 * self.ch
        emb = NoiseEmbedding(
            self.ch, emb_dim, self.embedding, self.embedding_scale, name="noise_embed", **kw
        )(jnp.broadcast_to(noise_label, (b,)))
        if self.num_classes > 0:
            class_embed = ClassEmbedding(
                self.num_classes,
                emb_dim,
                self.cep_scale,
                self.cep_noise,
                name="class_embed",
                **kw,
            )
            emb = emb + class_embed(cond, b, train)
        augment = self._augment_embedding(augment_label, b, emb_dim, kw)
        if augment is not None:  # nothing at all is added when augment_dim=0
            emb = emb + augment
        aux = aux_time_embedding(self, aux_time, b, self.ch, emb_dim, kw)
        if aux is not None:  # nothing at all is added when aux_time_embed=False
            emb = emb + aux

        h = conv(self.ch, name="conv_in", **kw)(x.astype(self.dtype))
        skips = [h]
        for level, mult in enumerate(self.ch_mult):
            res = height >> level
            for i in range(self.num_res_blocks):
                h = res_cls(self.ch * mult, self.dropout, name=f"down{level}_res{i}", **kw)(
                    h, emb, deterministic
                )
                if res in attn_res:
                    h = attend(h, res, f"down{level}_attn{i}")
                skips.append(h)
            self._capture(f"enc{level}", h, train)
            if level < levels - 1:
                if self.resample == "conv":
                    h = conv(h.shape[-1], stride=2, name=f"down{level}_resample", **kw)(h)
                else:
                    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
                skips.append(h)

        h = res_cls(h.shape[-1], self.dropout, name="mid_res0", **kw)(h, emb, deterministic)
        h = attend(h, "mid", "mid_attn")
        h = res_cls(h.shape[-1], self.dropout, name="mid_res1", **kw)(h, emb, deterministic)
        self._capture("mid", h, train)

        for level in reversed(range(levels)):
            res = height >> level
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_cls(
                    self.ch * self.ch_mult[level], self.dropout, name=f"up{level}_res{i}", **kw
                )(h, emb, deterministic)
                if res in attn_res:
                    h = attend(h, res, f"up{level}_attn{i}")
            if level > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest neighbour
                h = conv(h.shape[-1], name=f"up{level}_resample", **kw)(h)

        h = nn.silu(group_norm(h.shape[-1], name="norm_out", **kw)(h))
        h = conv(channels, zero_init=True, name="conv_out", **kw)(h)
        return h.astype(jnp.float32)
