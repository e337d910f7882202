"""Condition-embedding perturbation (CEP): training-only, exact off switch, its distribution."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from jaxdiff.experiment.builders import build_model
from jaxdiff.models import DiT, UNet
from jaxdiff.models.layers import ClassEmbedding

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
T = jnp.asarray(RNG.uniform(-1, 1, 4), jnp.float32)
Y = jnp.asarray([0, 3, 10, 7], jnp.int32)  # 10: the null class is perturbed too
MODELS = {
    "unet": UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_classes=10),
    "dit": DiT(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10),
}


def _class_embeddings(model, params, train, key=1):
    """The network output and its class embedding's output (captured)."""
    out, state = model.apply(
        {"params": params},
        X,
        T,
        Y,
        train=train,
        rngs={"dropout": jax.random.key(key)},
        capture_intermediates=lambda m, method: isinstance(m, ClassEmbedding),
    )
    return out, state["intermediates"]["class_embed"]["__call__"][0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cep_is_training_only_and_scale_zero_is_plain(name):
    plain = MODELS[name]
    params = nn.unbox(plain.init(jax.random.key(0), X, T, Y))["params"]
    # Random params: at initialisation the outputs are exactly zero (zero-init last layers).
    leaves, tree = jax.tree.flatten(params)
    noise = [RNG.standard_normal(np.shape(p)).astype(np.float32) * 0.1 for p in leaves]
    params = jax.tree.unflatten(tree, [p + n for p, n in zip(leaves, noise, strict=True)])
    table = params["class_embed"]["table"]["embedding"]
    base_train, emb = _class_embeddings(plain, params, True)
    base_eval, _ = _class_embeddings(plain, params, False)
    np.testing.assert_array_equal(emb, table[Y])
    zero = plain.clone(cep_scale=0.0, cep_noise="uniform")
    np.testing.assert_array_equal(_class_embeddings(zero, params, True)[0], base_train)
    gamma = 2.0
    cep = plain.clone(cep_scale=gamma)
    # Sampling never perturbs: the same params give the plain network's output exactly.
    np.testing.assert_array_equal(_class_embeddings(cep, params, False)[0], base_eval)
    out, emb = _class_embeddings(cep, params, True)
    delta = np.asarray(emb - table[Y], np.float64)
    d = table.shape[-1]
    assert np.all(np.abs(delta) > 0) and not np.allclose(out, base_train)
    # |delta|^2 / d is the per-entry variance gamma^2 / d: loose, from one small draw.
    np.testing.assert_allclose(np.mean(delta**2), gamma**2 / d, rtol=0.5)
    # Different keys draw different perturbations.
    assert not np.array_equal(_class_embeddings(cep, params, True, key=2)[1], emb)


@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
def test_perturbation_distribution_matches_the_formula(noise):
    gamma, d, n = 1.5, 16, 8192
    layer = ClassEmbedding(num_classes=3, features=d, cep_scale=gamma, cep_noise=noise)
    labels = jnp.zeros((n,), jnp.int32)
    params = nn.unbox(layer.init(jax.random.key(0), labels, n))
    emb = layer.apply(params, labels, n, True, rngs={"dropout": jax.random.key(5)})
    delta = np.asarray(emb, np.float64) - np.asarray(params["params"]["table"]["embedding"][0])
    bound = gamma / math.sqrt(d)
    var = bound**2 if noise == "gaussian" else bound**2 / 3
    # n * d = 131072 draws: the standard errors of the mean and variance are ~0.3% and ~0.4%
    # of the scale, so these tolerances are > 5 sigma.
    assert abs(delta.mean()) < 0.015 * bound
    np.testing.assert_allclose(delta.var(), var, rtol=0.03)
    kurtosis = np.mean((delta - delta.mean()) ** 4) / delta.var() ** 2
    if noise == "uniform":
        assert np.abs(delta).max() <= bound * (1 + 1e-6)
        np.testing.assert_allclose(kurtosis, 1.8, rtol=0.03)  # uniform: 9/5
    else:
        np.testing.assert_allclose(kurtosis, 3.0, rtol=0.05)
    # Independent across examples and features: no correlation between two coordinates.
    assert abs(np.corrcoef(delta[:, 0], delta[:, 1])[0, 1]) < 0.05


def test_bad_cep_values_name_the_allowed_ones():
    with pytest.raises(ValueError, match=r"cep_noise 'laplace'.*\('gaussian', 'uniform'\)"):
        MODELS["unet"].clone(cep_noise="laplace").init(jax.random.key(0), X, T, Y)
    with pytest.raises(ValueError, match="cep_scale=-1.0 must be >= 0"):
        MODELS["dit"].clone(cep_scale=-1.0).init(jax.random.key(0), X, T, Y)


def test_config_fields_reach_the_model():
    config = tiny_config(1)
    assert (config.model.cep_scale, config.model.cep_noise) == (0.0, "gaussian")
    config.model.cep_scale, config.model.cep_noise = 0.5, "uniform"
    model = build_model(config, 10)
    assert (model.cep_scale, model.cep_noise) == (0.5, "uniform")
