"""The optional second scalar input (``aux_time``) of UNet and DiT.

Params come from ``eval_shape`` filled with noise (no init compile): zero-initialised
layers (ResBlock conv2, DiT's final layer) would otherwise hide the conditioning.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.aux_time import AuxEmbedding
from jaxdiff.models.dit import DiT
from jaxdiff.models.unet import UNet

UNET = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
DIT = dict(patch_size=2, hidden_size=16, depth=1, num_heads=2, frequency_features=16)
X = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
T = jnp.asarray([0.3, 0.7])
A0, A1 = jnp.asarray([0.0, 0.0]), jnp.asarray([0.5, 0.25])


def _shapes(model):
    tree = jax.eval_shape(model.init, jax.random.key(0), X, T)["params"]
    return jax.tree.map(lambda a: a.shape, nn.unbox(tree))


def _random_params(model, seed):
    rng = np.random.default_rng(seed)
    shapes = _shapes(model)
    is_shape = lambda s: isinstance(s, tuple)  # noqa: E731
    return jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32), shapes, is_leaf=is_shape
    )


def _apply(model):
    return jax.jit(lambda p, a: model.apply({"params": p}, X, T, aux_time=a))


UNET_AUX = UNet(**UNET, aux_time_embed=True)
UNET_AUX_APPLY = _apply(UNET_AUX)  # shared by both UNet tests: one compile


def test_aux_embedding_starts_at_zero():
    emb = AuxEmbedding(8, 16)
    params = emb.init(jax.random.key(0), A1)
    out = emb.apply(params, jnp.asarray([0.1, 3.0]))
    assert out.shape == (2, 16)
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("cls,kw", [(UNet, UNET), (DiT, DIT)])
def test_aux_time_adds_one_subtree_and_starts_as_the_plain_network(cls, kw):
    plain = cls(**kw)
    aux = UNET_AUX if cls is UNet else cls(**kw, aux_time_embed=True)
    # Default off: no new parameter; with the flag: exactly one extra subtree.
    shapes_plain, shapes_aux = _shapes(plain), _shapes(aux)
    assert "aux_time_embed" not in shapes_plain
    assert set(shapes_aux) - set(shapes_plain) == {"aux_time_embed"}
    assert {k: v for k, v in shapes_aux.items() if k != "aux_time_embed"} == shapes_plain
    # With the embedding's zero-initialised last layer: the plain network, for any aux.
    p_aux = _random_params(aux, 1)
    fc2 = p_aux["aux_time_embed"]["fc2"]
    p_aux["aux_time_embed"]["fc2"] = jax.tree.map(jnp.zeros_like, fc2)
    p_plain = {k: v for k, v in p_aux.items() if k != "aux_time_embed"}
    out_plain = jax.jit(lambda p: plain.apply({"params": p}, X, T))(p_plain)
    apply_aux = UNET_AUX_APPLY if cls is UNet else _apply(aux)
    np.testing.assert_allclose(apply_aux(p_aux, A1), out_plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="aux_time_embed=True"):
        jax.eval_shape(lambda p: plain.apply({"params": p}, X, T, aux_time=T), p_plain)
    with pytest.raises(ValueError, match="one value per sample"):
        jax.eval_shape(apply_aux, p_aux, jnp.zeros((3,)))


def test_unet_output_depends_on_aux_time_under_jit_vmap_and_grad():
    params = _random_params(UNET_AUX, 3)
    out0, out1 = UNET_AUX_APPLY(params, A0), UNET_AUX_APPLY(params, A1)
    assert float(jnp.max(jnp.abs(out1 - out0))) > 1e-3
    # vmap over a stack of aux values equals one call per value.
    stacked = jax.jit(jax.vmap(UNET_AUX_APPLY, in_axes=(None, 0)))(params, jnp.stack([A0, A1]))
    np.testing.assert_allclose(stacked, jnp.stack([out0, out1]), rtol=1e-5, atol=1e-5)
    # Gradients reach aux_time and the new parameters.
    loss = lambda a, p: jnp.sum(UNET_AUX_APPLY(p, a) ** 2)  # noqa: E731
    g_aux, g_p = jax.jit(jax.grad(loss, argnums=(0, 1)))(A1, params)
    assert float(jnp.max(jnp.abs(g_aux))) > 0
    assert float(jnp.max(jnp.abs(g_p["aux_time_embed"]["fc1"]["kernel"]))) > 0
