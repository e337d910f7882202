"""Self-attention shared by the UNet and the DiT, and how its implementation is chosen.

Kernels follow :mod:`jaxdiff.models.layers`' logical axis names: ``q/k/v``
``("embed", None, "heads", "kv")`` (the ``None`` axis is the 3-way q/k/v split), output
``("heads", "kv", "embed")``. On a GPU in bf16/fp16 ``attention_impl=None`` picks cuDNN's
fused attention (:func:`resolve_attention`); elsewhere XLA's einsum path.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import partitioned, xavier, zeros

ATTENTION_IMPLS: tuple[str | None, ...] = (None, "auto", "xla", "cudnn")
"""Values of the models' ``attention_impl`` (None means ``"auto"``)."""

CUDNN_ATTENTION_TARGET = "__cudnn$fmha"
"""Prefix of the custom-call targets of cuDNN's fused attention in compiled HLO."""

# cuDNN's fused attention takes head dims that are multiples of 8 up to 128 on every GPU it
# supports (256 from Hopper on); 128 keeps "auto" safe on all of them.
_CUDNN_MAX_HEAD_DIM = 128


def resolve_attention(implementation: str | None, dtype: jnp.dtype, head_dim: int) -> str:
    """The ``implementation=`` of ``jax.nn.dot_product_attention`` to use.

    ``"auto"`` (or None) picks cuDNN's fused flash attention on a GPU when the compute
    dtype is bfloat16/float16 and the head dim is a multiple of 8 up to 128, which is
    when cuDNN accepts the shapes; everywhere else (CPU, TPU, float32) it picks XLA's
    einsum path. ``jax.nn.dot_product_attention`` itself treats None as XLA, so without
    this a GPU run would never reach cuDNN.

    Args:
      implementation: None, ``"auto"``, ``"xla"`` or ``"cudnn"``.
      dtype: Compute dtype of q, k and v.
      head_dim: Width of one head.

    Returns:
      ``"xla"`` or ``"cudnn"``.

    Raises:
      ValueError: For an unknown implementation.
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(
            f"unknown attention_impl {implementation!r}; allowed: {ATTENTION_IMPLS} "
            "(None and 'auto' pick cuDNN on GPU for bf16/fp16, XLA elsewhere)"
        )
    if implementation in ("xla", "cudnn"):
        return implementation
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fits = head_dim % 8 == 0 and head_dim <= _CUDNN_MAX_HEAD_DIM
    return "cudnn" if jax.default_backend() == "gpu" and half and fits else "xla"


def cudnn_attention_calls(hlo_text: str) -> int:
    """Number of cuDNN fused-attention custom calls in compiled HLO text.

    Use it to check that the fast path really runs, e.g.
    ``cudnn_attention_calls(jax.jit(f).lower(*args).compile().as_text())``: a forward
    pass has one call per attention layer, a training step one more per layer for the
    backward kernel.

    Args:
      hlo_text: Text of a compiled (optimised) HLO module.

    Returns:
      How many instructions call a ``__cudnn$fmha*`` target.
    """
    return hlo_text.count(f'custom_call_target="{CUDNN_ATTENTION_TARGET}')


class SelfAttention(nn.Module):
    """Multi-head self-attention over a token sequence ``[B, T, C]``.

    Attention runs through :func:`jax.nn.dot_product_attention` with the implementation
    :func:`resolve_attention` picks: cuDNN's fused kernel on a GPU in bf16/fp16, XLA
    elsewhere (``"xla"`` or ``"cudnn"`` force one; cuDNN raises on shapes it cannot take).

    With ``identity=True`` the attention map is replaced by the identity, so each
    token's output is its own value vector (then the output projection as usual).
    This is the perturbation of perturbed-attention guidance (PAG).

    With ``donor`` (int ``[B]``), token ``t`` of example ``i`` attends with the attention
    probabilities of example ``donor[i]`` over its own values: Prompt-to-Prompt's
    self-attention replacement, used by attention-injected editing
    (:func:`jaxdiff.samplers.inversion.direct_inversion_edit`); ``donor[i] = i`` is plain
    attention (computed as an explicit softmax, so equal up to rounding).

    Attributes:
      num_heads: Number of heads; ``C`` must be divisible by it.
      implementation: None/``"auto"``, ``"xla"`` or ``"cudnn"`` (see
        :func:`resolve_attention`).
      zero_init_out: Zero-initialise the output projection (block starts as identity).
      dtype: Compute dtype.
      param_dtype: Parameter dtype.
    """

    num_heads: int
    implementation: str | None = None
    zero_init_out: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, identity: bool = False, donor: jax.Array | None = None
    ) -> jax.Array:
        """Applies attention.

        Args:
          x: ``[B, T, C]`` tokens.
          identity: Static; use the identity attention map (PAG).
          donor: int ``[B]`` or None: example ``i`` uses example ``donor[i]``'s attention
            probabilities (P2P self-attention replacement).

        Returns:
          ``[B, T, C]`` in ``dtype``.
        """
        c = x.shape[-1]
        if c % self.num_heads:
            raise ValueError(f"{c} channels not divisible by {self.num_heads} heads")
        head_dim = c // self.num_heads
        qkv = nn.DenseGeneral(
            (3, self.num_heads, head_dim),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(xavier, ("embed", None, "heads", "kv")),
            bias_init=partitioned(zeros, (None, "heads", "kv")),
            name="qkv",
        )(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, N, H]
        if identity:
            h = v
        elif donor is not None:
            logits = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
            h = jnp.einsum("bnts,bsnh->btnh", probs[jnp.asarray(donor, jnp.int32)], v)
        else:
            impl = resolve_attention(self.implementation, q.dtype, head_dim)
            h = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        return nn.DenseGeneral(
            c,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(
                zeros if self.zero_init_out else xavier, ("heads", "kv", "embed")
            ),
            bias_init=partitioned(zeros, ("embed",)),
            name="out",
        )(h)
