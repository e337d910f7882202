"""The pieces of the DiT (:mod:`jaxdiff.models.dit`): position embedding and adaLN-Zero blocks.

:class:`DiTBlock` is one adaLN-Zero transformer block; :class:`ScannedDiTBlock` is the same
block in ``nn.scan``'s ``(carry, *xs) -> (carry, ys)`` form, with the guidance variants'
per-block flag. Both run :func:`block_forward`, so the two layouts compute the same maths
and hold the same params.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.attention import SelfAttention
from jaxdiff.models.layers import dense, zeros

MERGE_MODES: tuple[str, ...] = ("others", "first")
"""Reference sets of negative token merging (see :func:`merge_tokens`)."""


@flax.struct.dataclass
class TokenMerge:
    """Arguments of negative token merging (NegToMe), the DiT's ``"negtome"`` variant.

    Passed at call time (``model.apply(..., variant="negtome", merge=TokenMerge(...))``),
    so ``alpha`` and ``tau`` are traced values: one compiled network serves any of them.

    Attributes:
      alpha: Merge strength, a scalar or a per-example ``[batch]`` array; 0 = no change.
      tau: Cosine-similarity threshold; a token is merged only if its best match is
        strictly more similar than ``tau``.
      groups: Static; the batch is ``groups`` independent blocks of equal size (e.g. 2
        for a conditional + unconditional CFG batch): tokens are only matched within
        their own block, as the reference merges each CFG half separately.
      mode: Static; ``"others"`` (each image against all the other images of its
        block) or ``"first"`` (each image against the block's first image, which is left
        unchanged: the reference implementation's diversity setting).
    """

    alpha: Any = 0.9
    tau: Any = 0.65
    groups: int = flax.struct.field(pytree_node=False, default=1)
    mode: str = flax.struct.field(pytree_node=False, default="others")


def merge_tokens(
    h: jax.Array, alpha: Any, tau: Any, groups: int = 1, mode: str = "others"
) -> jax.Array:
    """Negative token merging: push each token away from its best match in other images.

    For token ``x_i`` of an image, ``r_j`` is the most cosine-similar token among the
    reference tokens (all tokens of the *other* images of its block, or of the block's
    first image); if ``cos(x_i, r_j) > tau`` the token becomes ``(1 + alpha) x_i - alpha
    r_j``, else it is unchanged. Ties pick the first reference token (row-major order of
    image, then token). Cost ``O(n^2 T^2 D)`` per block of ``n`` images with ``T`` tokens.

    Args:
      h: ``[batch, T, D]`` tokens.
      alpha: Scalar or ``[batch]`` merge strength.
      tau: Scalar similarity threshold.
      groups: Static number of independent equal blocks the batch splits into.
      mode: Static, one of :data:`MERGE_MODES`.

    Returns:
      ``[batch, T, D]`` merged tokens (``h``'s dtype).

    Raises:
      ValueError: for an unknown mode or a batch not divisible by ``groups``.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"unknown token-merge mode {mode!r}; allowed: {MERGE_MODES}")
    b, t, d = h.shape
    if groups < 1 or b % groups:
        raise ValueError(f"batch {b} does not split into {groups} equal token-merge groups")
    n = b // groups
    hf = h.astype(jnp.float32)
    unit = hf / jnp.maximum(jnp.linalg.norm(hf, axis=-1, keepdims=True), 1e-12)
    g_h, g_u = hf.reshape(groups, n, t, d), unit.reshape(groups, n, t, d)
    img = jnp.arange(n)
    if mode == "first":
        sim = jnp.einsum("gitd,gsd->gits", g_u, g_u[:, 0])  # [G, n, T, T]
        refs = g_h[:, 0]  # [G, T, D]
        merge_ok = (img > 0)[None, :, None]  # the reference image itself is left alone
    else:
        sim = jnp.einsum("gitd,gjsd->gitjs", g_u, g_u)  # [G, n, T, n, T]
        # An image never matches its own tokens.
        sim = jnp.where((img[:, None] == img[None, :])[None, :, None, :, None], -jnp.inf, sim)
        sim = sim.reshape(groups, n, t, n * t)
        refs = g_h.reshape(groups, n * t, d)
        merge_ok = jnp.full((1, n, 1), n > 1)
    best = jnp.argmax(sim, axis=-1)  # [G, n, T]
    best_sim = jnp.max(sim, axis=-1)
    r = jax.vmap(lambda ref, idx: ref[idx])(refs, best)  # [G, n, T, D]
    a = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), (b,)).reshape(groups, n, 1, 1)
    merged = (1.0 + a) * g_h - a * r
    use = (best_sim > jnp.asarray(tau, jnp.float32)) & merge_ok
    out = jnp.where(use[..., None], merged, g_h)
    return out.reshape(b, t, d).astype(h.dtype)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE/DiT layout).

    The first half of the channels encodes the token's column, the second half its row
    (the reference builds its grid with ``meshgrid(grid_w, grid_h)``, so the column comes
    first), each as 1-D features ``[sin(p w_i), cos(p w_i)]`` at frequencies
    ``w_i = 1 / 10000^(i / (dim/4))``. Computed in float64, then cast to float32, as in
    the reference.

    Args:
      grid_h: Number of token rows.
      grid_w: Number of token columns.
      dim: Embedding width, divisible by 4.

    Returns:
      ``[grid_h * grid_w, dim]`` float32 array (row-major token order).
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for 2-D sin-cos")
    omega = 1.0 / 10_000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def one_d(pos: np.ndarray) -> np.ndarray:
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    return np.concatenate([one_d(cols), one_d(rows)], axis=1).astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """AdaLN modulation ``x * (1 + scale) + shift`` broadcast over tokens.

    Args:
      x: ``[B, T, C]`` normalised tokens.
      shift: ``[B, C]``.
      scale: ``[B, C]``.

    Returns:
      ``[B, T, C]``.
    """
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(dtype: jnp.dtype) -> nn.LayerNorm:
    """DiT's LayerNorm: no affine parameters (adaLN supplies them), ``eps = 1e-6``."""
    return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype)


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block.

    Attributes:
      hidden_size: Token width.
      num_heads: Attention heads.
      mlp_ratio: MLP hidden width / ``hidden_size``.
      dropout: Dropout rate on the attention and MLP residual branches.
      attention_impl: ``implementation=`` of ``jax.nn.dot_product_attention``.
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        c: jax.Array,
        deterministic: bool = True,
        pag: bool = False,
        merge: TokenMerge | None = None,
    ) -> jax.Array:
        """Applies the block.

        Args:
          x: ``[B, T, hidden_size]`` tokens.
          c: ``[B, hidden_size]`` conditioning.
          deterministic: Static; disables dropout.
          pag: Static; identity attention map (perturbed-attention guidance).
          merge: Negative token merging of the attention output (NegToMe), or None.

        Returns:
          ``[B, T, hidden_size]``.
        """
        return block_forward(self, x, c, deterministic, pag, merge)


def block_forward(
    block: DiTBlock,
    x: jax.Array,
    c: jax.Array,
    deterministic: bool,
    pag: bool | jax.Array,
    merge: TokenMerge | None = None,
) -> jax.Array:
    """The block's maths, shared by the unrolled and the scanned block.

    Called inside the block's compact ``__call__``, so the submodules belong to it.
    ``pag`` is a Python bool (static: one attention path is traced) or a traced scalar
    bool (scanned blocks: both paths run and the flag selects one). ``merge`` applies
    :func:`merge_tokens` to the attention output (after its output projection, before
    the gated residual), where the NegToMe reference merges.
    """
    kw = dict(dtype=block.dtype, param_dtype=block.param_dtype)
    d = block.hidden_size
    mod = dense(6 * d, ("embed", "mlp"), kernel_init=zeros, name="adaLN", **kw)(nn.silu(c))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)

    h = modulate(layer_norm(block.dtype)(x), shift_a, scale_a)
    attn = SelfAttention(block.num_heads, block.attention_impl, name="attn", **kw)
    if isinstance(pag, bool):
        h = attn(h, pag)
    else:  # one module called twice: both paths share the attention's params
        h = jnp.where(pag, attn(h, True), attn(h, False))
    if merge is not None:
        h = merge_tokens(h, merge.alpha, merge.tau, merge.groups, merge.mode)
    h = nn.Dropout(block.dropout)(h, deterministic=deterministic)
    x = x + gate_a[:, None] * h

    h = modulate(layer_norm(block.dtype)(x), shift_m, scale_m)
    h = dense(int(d * block.mlp_ratio), ("embed", "mlp"), name="fc1", **kw)(h)
    h = nn.gelu(h, approximate=True)
    h = nn.Dropout(block.dropout)(h, deterministic=deterministic)
    h = dense(d, ("mlp", "embed"), name="fc2", **kw)(h)
    return x + gate_m[:, None] * h


class ScannedDiTBlock(DiTBlock):
    """A :class:`DiTBlock` in the ``(carry, *xs) -> (carry, ys)`` form of ``nn.scan``.

    The carry is the token array; ``c`` is broadcast to every step and ``flag`` (only
    with a guidance variant) is the step's scalar bool: identity attention for
    ``"pag"``, skip the block for ``"slg"`` (unused by ``"negtome"``, which merges in
    every block with the broadcast ``merge``).

    Attributes:
      deterministic: Disables dropout.
      variant: None, ``"pag"``, ``"slg"`` or ``"negtome"``.
      activation_sharding: Sharding constraint of the block's output (or None).
    """

    deterministic: bool = True
    variant: str | None = None
    activation_sharding: Any = None

    @nn.compact
    def __call__(  # type: ignore[override]
        self,
        x: jax.Array,
        c: jax.Array,
        flag: jax.Array | None = None,
        merge: TokenMerge | None = None,
    ) -> tuple[jax.Array, None]:
        """Applies one block; returns ``(tokens, None)``."""
        pag = flag if self.variant == "pag" else False
        h = block_forward(self, x, c, self.deterministic, pag, merge)
        if self.variant == "slg":
            h = jnp.where(flag, x, h)  # skip-layer guidance: the block is the identity
        if self.activation_sharding is not None:
            h = jax.lax.with_sharding_constraint(h, self.activation_sharding)
        return h, None


__all__ = [
    "MERGE_MODES",
    "DiTBlock",
    "ScannedDiTBlock",
    "TokenMerge",
    "block_forward",
    "layer_norm",
    "merge_tokens",
    "modulate",
    "sincos_2d",
]
