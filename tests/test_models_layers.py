"""Tests for the shared model layers and the model factory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import DiT, UNet, create_model
from jaxdiff.models.attention import SelfAttention
from jaxdiff.models.layers import (
    LOGICAL_AXES,
    ClassEmbedding,
    check_variant,
    fourier_features,
    sinusoidal_features,
)


def test_logical_axes_vocabulary():
    assert set(LOGICAL_AXES) == {
        "embed", "mlp", "heads", "kv", "vocab", "conv_h", "conv_w", "norm", "patch", "layers"
    }  # fmt: skip


def test_check_variant():
    check_variant(None)
    check_variant("pag")
    with pytest.raises(ValueError, match=r"'foo'.*\(None, 'pag', 'slg'\)"):
        check_variant("foo")


@pytest.mark.parametrize(
    "features",
    [
        lambda x: sinusoidal_features(1000.0 * x, 64),  # positional, default scale
        lambda x: fourier_features(x, 64, 16.0),  # fourier, EDM scale
    ],
)
def test_noise_features_resolve_both_label_ranges(features):
    # t in [0, 1] (VP / flow) and log(sigma)/4 in about [-2, 2] (EDM): neighbouring
    # labels must map to clearly different features, distant ones too.
    labels = np.concatenate([np.linspace(0.0, 1.0, 101), np.linspace(-2.0, 2.0, 101)])
    f = np.asarray(jax.jit(features)(jnp.asarray(labels, jnp.float32)))
    assert f.shape == (202, 64) and np.all(np.abs(f) <= 1.0 + 1e-6)
    dist = np.linalg.norm(f[:, None] - f[None], axis=-1)
    off_diag = dist[
        ~np.eye(len(labels), dtype=bool) & (np.abs(labels[:, None] - labels[None]) > 1e-6)
    ]
    assert off_diag.min() > 0.1


def test_class_embedding_null_row():
    emb = ClassEmbedding(num_classes=3, features=4)
    variables = emb.init(jax.random.key(0, impl="unsafe_rbg"), jnp.zeros((2,), jnp.int32), 2)
    table = nn.unbox(variables)["params"]["table"]["embedding"]
    assert table.shape == (4, 4)
    spec = nn.get_partition_spec(variables)["params"]["table"]["embedding"]
    assert tuple(spec) == ("vocab", "embed")
    np.testing.assert_array_equal(emb.apply(variables, None, 2), table[jnp.array([3, 3])])


def test_identity_attention_returns_projected_values():
    attn = SelfAttention(num_heads=2)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 8)), jnp.float32)
    # Random numpy params: XLA:CPU compiles the threefry initialisers slowly.
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(attn.init, jax.random.key(0), x)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)
    p = nn.unbox(variables)["params"]
    v = jnp.einsum("btc,cnh->btnh", x, p["qkv"]["kernel"][:, 2]) + p["qkv"]["bias"][2]
    expected = jnp.einsum("btnh,nhc->btc", v, p["out"]["kernel"]) + p["out"]["bias"]
    apply = jax.jit(attn.apply, static_argnums=2)
    np.testing.assert_allclose(apply(variables, x, True), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(apply(variables, x, False), expected, atol=1e-2)


def test_create_model():
    assert isinstance(create_model("unet", ch=8), UNet)
    dit = create_model("DiT-XL/2", num_classes=10)
    assert isinstance(dit, DiT) and dit.depth == 28 and dit.num_classes == 10
    with pytest.raises(ValueError, match="'unet', 'dit', 'mlp'"):
        create_model("resnet")
