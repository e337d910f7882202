"""Diffusion Transformer (DiT, Peebles & Xie 2023) with adaLN-Zero blocks.

Layout: patchify (reshape + Dense, kernel ``("patch", "embed")``) -> add a fixed 2-D
sin-cos position embedding -> ``depth`` adaLN-Zero transformer blocks -> adaLN final
layer -> unpatchify. The conditioning vector is ``c = noise_embed + class_embed``.
Every modulation Dense and the final linear layer start at zero, so the network
outputs exactly zero at initialisation (a good start for EDM preconditioning).

Named sizes (:data:`DIT_CONFIGS`, :meth:`DiT.from_name`): S (depth 12, width 384,
6 heads), B (12, 768, 12), L (24, 1024, 16), XL (28, 1152, 16); the suffix ``/2``,
``/4``, ``/8`` is the patch size. The position embedding is a constant, not a (frozen)
parameter. Parameter counts on 32x32x4 inputs with 1000 classes: DiT-B/2 130,303,504
(130,315,808 with ``learn_sigma``; the reference's 130,512,416 adds its 196,608-entry
frozen position embedding); DiT-S/2 32,858,896 (reference 33.0M); DiT-XL/2 674,816,272
(674,834,720 with ``learn_sigma``: the reference's 675,129,632 less its 294,912-entry
position embedding).

The maths matches the official implementation (facebookresearch/DiT, and SiT, which
shares the network), so its published weights load through
:mod:`jaxdiff.pretrained.dit` and reproduce its outputs: sinusoidal timestep features
``[cos, sin]`` of the raw label times ``embedding_scale`` (1.0 for the published
weights, which take DDPM step indices 0..999, or SiT's t in [0, 1]), a class table with
the null class as its last row, LayerNorm without affine parameters and ``eps=1e-6``,
tanh-approximated GELU, fused q/k/v laid out ``(3, heads, head_dim)``, patches flattened
``(row, column, channel)`` and, with ``learn_sigma``, the final layer emitting ``2 C``
channels per pixel (the noise prediction first, then DDPM's variance interpolation).

Compatibility note: the 2-D position embedding now follows the reference's channel
order (the column coordinate fills the first half of the channels, the row the second);
earlier versions of jaxdiff put the row first, so DiT weights trained with those
versions are not compatible with this module (their outputs change); retrain them.

Logical axes follow :mod:`jaxdiff.models.layers`; adaLN modulation kernels are
``("embed", "mlp")``.

Fast paths (see the :class:`DiT` attributes): ``remat`` picks a rematerialisation policy
(:mod:`jaxdiff.models.remat`) and ``scan_blocks`` runs the blocks under ``nn.scan``, whose
params are the unrolled ones stacked on a leading ``"layers"`` axis under ``"blocks"``;
:func:`stack_blocks`, :func:`unstack_blocks` and :func:`to_layout` convert checkpoints
(e.g. the published weights, which load unrolled) between the two layouts.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.aux_time import aux_time_embedding
from jaxdiff.models.dit_blocks import (
    DiTBlock,
    ScannedDiTBlock,
    TokenMerge,
    layer_norm,
    modulate,
    sincos_2d,
)
from jaxdiff.models.dit_layout import stack_blocks, to_layout, unstack_blocks
from jaxdiff.models.layers import (
    TOKEN_VARIANTS,
    ClassEmbedding,
    NoiseEmbedding,
    check_variant,
    dense,
    zeros,
)
from jaxdiff.models.remat import maybe_remat
from jaxdiff.models.repa import check_repa_fields, repa_project

DIT_CONFIGS: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
"""Depth, width and heads of the named DiT sizes."""


def dit_config(name: str) -> dict[str, int]:
    """Field values of a named DiT size such as ``"B/2"``.

    Args:
      name: ``"<S|B|L|XL>/<patch>"``, e.g. ``"XL/2"``.

    Returns:
      Dict with ``depth``, ``hidden_size``, ``num_heads`` and ``patch_size``.

    Raises:
      ValueError: If the name is malformed or the size unknown.
    """
    size, _, patch = name.partition("/")
    if size not in DIT_CONFIGS or not patch.isdigit():
        raise ValueError(f"bad DiT name {name!r}; expected one of {tuple(DIT_CONFIGS)} + '/p'")
    return dict(DIT_CONFIGS[size], patch_size=int(patch))


class DiT(nn.Module):
    """Diffusion Transformer on ``[B, H, W, C]`` images or latents.

    ``variant`` (static) perturbs the network for guidance:

    * None: the normal network;
    * ``"pag"``: in the blocks listed in ``pag_layers`` the self-attention map is the
      identity (attention output = value projection, then the output projection);
    * ``"slg"``: the blocks listed in ``skip_layers`` are skipped (identity);
    * ``"negtome"``: negative token merging (NegToMe) of every block's attention output
      across the images of the batch, with the call's ``merge`` arguments
      (:class:`~jaxdiff.models.dit_blocks.TokenMerge`, default alpha 0.9, tau 0.65).

    Attributes:
      patch_size: Side of the square patches; H and W must be divisible by it.
      hidden_size: Token width.
      depth: Number of transformer blocks.
      num_heads: Attention heads.
      mlp_ratio: MLP hidden width / ``hidden_size``.
      num_classes: Real classes (0 = unconditional); id ``num_classes`` is the null
        class, used for every example when ``cond`` is None.
      embedding: Noise embedding kind, ``"positional"`` or ``"fourier"``.
      embedding_scale: Scale of the noise embedding (None = kind's default).
      frequency_features: Sinusoidal/Fourier features fed to the noise-embedding MLP.
      dropout: Dropout rate (active only with ``train=True``); 0 as in DiT.
      attention_impl: Passed as ``implementation=`` to
        ``jax.nn.dot_product_attention`` (e.g. ``"cudnn"`` on GPU with bf16).
      pag_layers: Block indices perturbed by ``"pag"``; None = the middle block.
      skip_layers: Block indices skipped by ``"slg"``; None = the middle block.
      learn_sigma: The final layer emits ``2 C`` channels per pixel in the reference's
        layout (the prediction, then DDPM's learned-variance interpolation, which jaxdiff's
        samplers do not use); the call still returns the first ``C`` unless
        ``return_all_channels``. Needed to load the published DiT/SiT weights.
      return_all_channels: With ``learn_sigma``, return all ``2 C`` channels (the
        reference's full output) instead of the first ``C``.
      aux_time_embed: Condition on a second per-sample scalar, the call's ``aux_time``
        (MeanFlow's ``t - r``, a guidance scale, ...): its zero-initialised embedding
        (:class:`jaxdiff.models.aux_time.AuxEmbedding`, params ``aux_time_embed``) joins the
        conditioning vector ``c``. Off by default (no parameter; ``aux_time`` must be None).
      aux_time_scale: Input scale of the ``aux_time`` features (None = the ``embedding``
        kind's default).
      remat: Rematerialisation policy of each block, a name from
        :data:`jaxdiff.models.remat.REMAT_POLICIES`: ``"none"`` (keep all activations:
        fastest, most memory), ``"dots"`` (keep the dense layers' matmul outputs,
        recompute the memory-bound elementwise ops and attention: most of the memory
        saving for little extra time) or ``"full"`` (keep only each block's input and
        recompute the block: least memory, ~ +33% FLOPs per training step). ``True`` /
        ``False`` mean ``"full"`` / ``"none"``.
      scan_blocks: Run the ``depth`` blocks under ``nn.scan``: one block is traced and
        compiled whatever the depth (constant compile time for deep models such as
        DiT-XL/2), and its params live under ``"blocks"`` with a leading axis of size
        ``depth`` (logical axis ``"layers"``) instead of ``block_0 .. block_{depth-1}``.
        Off by default: scanning can cost step time (measured slower on an H100), and
        the ``"pag"``/``"slg"`` variants then run every block's full computation and
        select per block. The outputs are the same either way; convert params between
        the layouts with :func:`stack_blocks`, :func:`unstack_blocks` or
        :func:`to_layout`. Composes with ``remat`` (each scanned step is rematerialised).
      repa_depth: REPA (:mod:`jaxdiff.models.repa`) aligns the tokens after this many
        blocks (REPA's ``encoder_depth``: 8 of SiT-XL's 28); used when ``repa_dim > 0``.
      repa_dim: Width of the frozen encoder's features: with ``repa_dim > 0`` a
        ``repa_projector`` MLP maps every token after block ``repa_depth`` to it in
        training passes (sown as ``"repa"``, ``[B, H/p, W/p, repa_dim]``). 0 (default): no
        projector, no params. Training with it needs ``scan_blocks=False``.
      repa_hidden: Hidden width of the REPA projector (REPA: 2048).
      cep_scale: Condition-embedding perturbation of the class embedding in training
        passes (CEP's gamma, see :class:`~jaxdiff.models.layers.ClassEmbedding`); 0 = off.
      cep_noise: CEP's distribution, ``"gaussian"`` or ``"uniform"``.
      activation_sharding: Optional ``jax.sharding.Sharding`` for the ``[B, T, D]``
        activations between blocks (e.g. batch over ``('data', 'fsdp')``, the rest
        replicated). With FSDP or tensor parallelism it stops XLA from resharding
        activations to follow the sharded weights; None leaves placement to XLA.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0
    embedding: str = "positional"
    embedding_scale: float | None = None
    frequency_features: int = 256
    dropout: float = 0.0
    attention_impl: str | None = None
    pag_layers: tuple[int, ...] | None = None
    skip_layers: tuple[int, ...] | None = None
    learn_sigma: bool = False
    return_all_channels: bool = False
    aux_time_embed: bool = False
    aux_time_scale: float | None = None
    remat: str | bool = "none"
    scan_blocks: bool = False
    repa_depth: int = 0
    repa_dim: int = 0
    repa_hidden: int = 2048
    cep_scale: float = 0.0
    cep_noise: str = "gaussian"
    activation_sharding: Any = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> DiT:
        """Builds a named size, e.g. ``DiT.from_name("S/2", num_classes=10)``.

        Args:
          name: ``"<S|B|L|XL>/<patch>"``.
          **overrides: Any other field (or a size field to override).

        Returns:
          The configured module.
        """
        return cls(**{**dit_config(name), **overrides})

    def _blocks(self, layers: tuple[int, ...] | None, field: str) -> frozenset[int]:
        chosen = (self.depth // 2,) if layers is None else tuple(layers)
        bad = [i for i in chosen if not -self.depth <= i < self.depth]
        if bad:
            raise ValueError(f"{field} {bad} out of range for depth {self.depth}")
        return frozenset(i % self.depth for i in chosen)

    def _scanned_blocks(
        self,
        h: jax.Array,
        c: jax.Array,
        block_args: tuple,
        block_kw: dict,
        train: bool,
        variant: str | None,
        pag: frozenset[int],
        skip: frozenset[int],
        merge: TokenMerge | None = None,
    ) -> jax.Array:
        """Runs the blocks under ``nn.scan``: params under ``"blocks"``, stacked on axis 0."""
        if self.depth == 0:
            return h
        # Remat first, then scan, so each step's activations are recomputed in the
        # backward pass; CSE prevention is unnecessary inside a scan.
        block_cls = maybe_remat(ScannedDiTBlock, self.remat, prevent_cse=False)
        chosen = pag if variant == "pag" else skip
        # Per-block flags only when a variant needs them: variant None adds no work.
        flags = () if variant is None else (jnp.asarray([i in chosen for i in range(self.depth)]),)
        merges = () if merge is None else (merge,)  # the same merge in every block
        blocks = nn.scan(
            block_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) + (0,) * len(flags) + (nn.broadcast,) * len(merges),
            length=self.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(
            *block_args,
            deterministic=not train,
            variant=variant,
            activation_sharding=self.activation_sharding,
            name="blocks",
            **block_kw,
        )
        h, _ = blocks(h, c, *flags, *merges)
        return h

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        noise_label: jax.Array,
        cond: jax.Array | None = None,
        *,
        train: bool = False,
        variant: str | None = None,
        aux_time: jax.Array | None = None,
        merge: TokenMerge | None = None,
    ) -> jax.Array:
        """Predicts the network output for noisy inputs.

        Args:
          x: ``[B, H, W, C]`` noisy images or latents.
          noise_label: ``[B]`` float noise labels (the formulation's ``c_noise``).
          cond: int32 ``[B]`` class labels or None (null class).
          train: Enables dropout (rng collection ``"dropout"``).
          variant: Static: None, ``"pag"``, ``"slg"`` or ``"negtome"`` (see the class
            docstring).
          aux_time: ``[B]`` float second scalar per sample (needs ``aux_time_embed``);
            None = zeros.
          merge: The ``"negtome"`` variant's arguments (None = the defaults); only
            with that variant.

        Returns:
          ``[B, H, W, C]`` float32 (``[B, H, W, 2 C]`` with ``learn_sigma`` and
          ``return_all_channels``).

        Raises:
          ValueError: Unknown variant, bad layer indices or indivisible image size, or
            ``aux_time`` without ``aux_time_embed``.
        """
        check_variant(variant, TOKEN_VARIANTS)
        if merge is not None and variant != "negtome":
            raise ValueError(f"merge= is for variant='negtome', got variant={variant!r}")
        if variant == "negtome" and merge is None:
            merge = TokenMerge()
        pag = self._blocks(self.pag_layers, "pag_layers") if variant == "pag" else frozenset()
        skip = self._blocks(self.skip_layers, "skip_layers") if variant == "slg" else frozenset()
        b, height, width, channels = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image {height}x{width} not divisible by patch size {p}")
        gh, gw = height // p, width // p
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        # Patchify by reshape + Dense: identical to a stride-p conv, but the kernel is
        # a plain matrix with a "patch" input axis.
        tokens = x.astype(self.dtype).reshape(b, gh, p, gw, p, channels)
        tokens = tokens.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * channels)
        h = dense(self.hidden_size, ("patch", "embed"), name="patch_embed", **kw)(tokens)
        h = h + jnp.asarray(sincos_2d(gh, gw, self.hidden_size), self.dtype)[None]

        c = NoiseEmbedding(
            self.frequency_features,
            self.hidden_size,
            self.embedding,
            self.embedding_scale,
            name="noise_embed",
            **kw,
        )(jnp.broadcast_to(noise_label, (b,)))
        if self.num_classes > 0:
            class_embed = ClassEmbedding(
                self.num_classes,
                self.hidden_size,
                self.cep_scale,
                self.cep_noise,
                name="class_embed",
                **kw,
            )
            c = c + class_embed(cond, b, train)
        aux = aux_time_embedding(self, aux_time, b, self.frequency_features, self.hidden_size, kw)
        if aux is not None:  # nothing at all is added when aux_time_embed=False
            c = c + aux

        block_args = (self.hidden_size, self.num_heads, self.mlp_ratio, self.dropout)
        block_kw = dict(attention_impl=self.attention_impl, **kw)
        depths = range(1, self.depth + 1)
        check_repa_fields(self.repa_hidden, self.repa_dim, "repa_depth", self.repa_depth, depths)
        repa_kw = dict(train=train, hidden=self.repa_hidden, features=self.repa_dim, **kw)
        if self.scan_blocks and self.repa_dim > 0 and train:
            raise ValueError(
                "REPA (repa_dim > 0) reads the tokens after block repa_depth, which nn.scan "
                "does not expose: train with scan_blocks=False (sampling may scan)"
            )
        if self.scan_blocks:
            h = self._scanned_blocks(h, c, block_args, block_kw, train, variant, pag, skip, merge)
            if self.is_initializing():  # the projector's params (same shapes), for loading
                repa_project(self, h.reshape(b, gh, gw, -1), **repa_kw)
        else:
            block_cls = maybe_remat(DiTBlock, self.remat, static_argnums=(3, 4))
            for i in range(self.depth):
                block = block_cls(*block_args, name=f"block_{i}", **block_kw)
                if i in skip and not self.is_initializing():
                    continue  # skip-layer guidance: the block is the identity
                h = block(h, c, not train, i in pag, merge)
                if self.activation_sharding is not None:
                    h = jax.lax.with_sharding_constraint(h, self.activation_sharding)
                if i + 1 == self.repa_depth:
                    repa_project(self, h.reshape(b, gh, gw, -1), **repa_kw)

        # Final layer: adaLN (shift, scale) then a zero-initialised linear map.
        shift, scale = jnp.split(
            dense(
                2 * self.hidden_size, ("embed", "mlp"), kernel_init=zeros, name="final_adaLN", **kw
            )(nn.silu(c)),
            2,
            axis=-1,
        )
        h = modulate(layer_norm(self.dtype)(h), shift, scale)
        out_ch = 2 * channels if self.learn_sigma else channels
        out = dense(p * p * out_ch, ("embed", "patch"), kernel_init=zeros, name="final", **kw)(h)
        # Each token's outputs are laid out (patch row, patch column, channel).
        out = out.reshape(b, gh, gw, p, p, out_ch).transpose(0, 1, 3, 2, 4, 5)
        out = out.reshape(b, height, width, out_ch).astype(jnp.float32)
        return out if self.return_all_channels else out[..., :channels]


# Param layouts: unrolled blocks ``block_0 .. block_{depth-1}`` (``scan_blocks=False``)
# or one ``blocks`` subtree whose leaves have a leading ``depth`` axis (``scan_blocks=True``).

__all__ = [
    "DIT_CONFIGS",
    "DiT",
    "DiTBlock",
    "dit_config",
    "modulate",
    "sincos_2d",
    "stack_blocks",
    "to_layout",
    "unstack_blocks",
]
