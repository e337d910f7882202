"""The pieces of the DiT (:mod:`jaxdiff.models.dit`): position embedding and adaLN-Zero blocks.

:class:`DiTBlock` is one adaLN-Zero transformer block; :class:`ScannedDiTBlock` is the same
block in ``nn.scan``'s ``(carry, *xs) -> (carry, ys)`` form, with the guidance variants'
per-block flag. Both run :func:`block_forward`, so the two layouts compute the same maths
and hold the same params.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import SelfAttention, dense, zeros


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
        self, x: jax.Array, c: jax.Array, deterministic: bool = True, pag: bool = False
    ) -> jax.Array:
        """Applies the block.

        Args:
          x: ``[B, T, hidden_size]`` tokens.
          c: ``[B, hidden_size]`` conditioning.
          deterministic: Static; disables dropout.
          pag: Static; identity attention map (perturbed-attention guidance).

        Returns:
          ``[B, T, hidden_size]``.
        """
        return block_forward(self, x, c, deterministic, pag)


def block_forward(
    block: DiTBlock, x: jax.Array, c: jax.Array, deterministic: bool, pag: bool | jax.Array
) -> jax.Array:
    """The block's maths, shared by the unrolled and the scanned block.

    Called inside the block's compact ``__call__``, so the submodules belong to it.
    ``pag`` is a Python bool (static: one attention path is traced) or a traced scalar
    bool (scanned blocks: both paths run and the flag selects one).
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
    ``"pag"``, skip the block for ``"slg"``.

    Attributes:
      deterministic: Disables dropout.
      variant: None, ``"pag"`` or ``"slg"``.
      activation_sharding: Sharding constraint of the block's output (or None).
    """

    deterministic: bool = True
    variant: str | None = None
    activation_sharding: Any = None

    @nn.compact
    def __call__(  # type: ignore[override]
        self, x: jax.Array, c: jax.Array, flag: jax.Array | None = None
    ) -> tuple[jax.Array, None]:
        """Applies one block; returns ``(tokens, None)``."""
        pag = flag if self.variant == "pag" else False
        h = block_forward(self, x, c, self.deterministic, pag)
        if self.variant == "slg":
            h = jnp.where(flag, x, h)  # skip-layer guidance: the block is the identity
        if self.activation_sharding is not None:
            h = jax.lax.with_sharding_constraint(h, self.activation_sharding)
        return h, None


__all__ = ["DiTBlock", "ScannedDiTBlock", "block_forward", "layer_norm", "modulate", "sincos_2d"]
