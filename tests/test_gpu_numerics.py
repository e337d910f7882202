"""GPU-only checks of the fast paths: cuDNN attention really runs and matches XLA's.

These need an NVIDIA GPU (``benchmarks/gpu_suite.sh`` runs them there); on any other
backend they are skipped, and the CPU-side logic they rely on (the implementation choice,
the HLO count) is tested in tests/test_fastpaths.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import DiT, cudnn_attention_calls

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="needs a GPU (cuDNN fused attention)"
)


def _dit(**kw):
    return DiT(patch_size=2, hidden_size=128, depth=2, num_heads=2, num_classes=10, **kw)


def _inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 4)), jnp.float32)
    return x, jnp.asarray([0.1, 0.5, 1.0, 2.0]), jnp.asarray([0, 3, 7, 10], jnp.int32)


def _nonzero_params(model, args):
    """Init params with the zero-initialised gates and output layer made non-zero."""
    params = model.init(jax.random.key(0), *args)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [
        leaf + 0.02 * jax.random.normal(k, leaf.shape, leaf.dtype)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, noisy)


def test_auto_attention_is_cudnn_in_bf16_and_in_the_compiled_program():
    args = _inputs()
    model = _dit(dtype=jnp.bfloat16)
    params = _nonzero_params(model, args)
    hlo = jax.jit(model.apply).lower(params, *args).compile().as_text()
    assert cudnn_attention_calls(hlo) == model.depth

    def loss(p):
        return jnp.mean(model.apply(p, *args, train=True) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert cudnn_attention_calls(hlo) == 2 * model.depth  # forward and backward kernels


def test_cudnn_attention_matches_xla_and_bf16_tracks_fp32():
    args = _inputs()
    params = _nonzero_params(_dit(), args)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(_dit(attention_impl="xla").apply(params, *args), np.float64)
        xla16 = np.asarray(_dit(dtype=jnp.bfloat16, attention_impl="xla").apply(params, *args))
        cudnn16 = np.asarray(_dit(dtype=jnp.bfloat16, attention_impl="cudnn").apply(params, *args))
    scale = np.linalg.norm(ref)
    # bf16 has an 8-bit mantissa: ~1% relative error in the output is expected.
    assert np.linalg.norm(cudnn16 - ref) / scale < 3e-2
    assert np.linalg.norm(xla16 - ref) / scale < 3e-2
    assert np.linalg.norm(cudnn16 - xla16) / scale < 3e-2
