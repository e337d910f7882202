"""AutoencoderKL: parity with diffusers 0.31.0 (goldens), posterior, dtypes, param axes."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.vae import LOGVAR_RANGE, AutoencoderKL, DiagonalGaussian
from jaxdiff.pretrained import vae as pretrained_vae
from jaxdiff.pretrained.weights_io import StateDict

GOLDENS = Path(__file__).parent / "goldens"
NAMES = ["vae_tiny", "vae_tiny_noquant", "vae_tiny_noattn"]


def _golden(name):
    with np.load(GOLDENS / f"{name}.npz") as g:
        data = {k: g[k] for k in g.files}
    config = json.loads(str(data.pop("config")))
    state = {k.removeprefix("state/"): data.pop(k) for k in list(data) if k.startswith("state/")}
    return config, state, data


def _loaded(name, **overrides):
    config, state, data = _golden(name)
    params = pretrained_vae.params_from_torch(StateDict(state, f"{name}.npz"), config)
    module, formulation = pretrained_vae.build({**config, **overrides})
    assert formulation is None
    return module, params, data


def _run(module, params, x, method=None):
    # Jitted: one compile beats op-by-op dispatch of the many small convs (tests run ~2x faster).
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x, method=method))
    return fn(params, jnp.asarray(x))


def _rel(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("name", NAMES)
def test_parity_with_diffusers(name):
    module, params, g = _loaded(name)
    post = _run(module, params, g["images"], "encode")
    assert post.mean.dtype == jnp.float32
    assert _rel(post.mean, g["mean"]) < 1e-4
    assert _rel(post.logvar, g["logvar"]) < 1e-4
    decoded = _run(module, params, g["latents"], "decode")
    assert decoded.shape == g["decoded"].shape
    assert _rel(decoded, g["decoded"]) < 1e-4
    # Odd image sizes: the downsampling pads only the bottom/right, as diffusers does.
    odd = _run(module, params, g["images_odd"], "encode")
    assert odd.mean.shape == g["mean_odd"].shape
    assert _rel(odd.mean, g["mean_odd"]) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_params_match_module_structure(name):
    module, params, g = _loaded(name)
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(g["images"]))
    want = jax.tree.map(lambda a: (a.shape, a.dtype), nn.unbox(abstract)["params"])
    have = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    assert have == want
    # Every parameter carries logical axis names; conv kernels the documented ones.
    specs = nn.get_partition_spec(abstract)["params"]
    assert tuple(specs["encoder"]["conv_in"]["kernel"]) == ("conv_h", "conv_w", "embed", "mlp")
    assert tuple(specs["encoder"]["conv_norm_out"]["scale"]) == ("norm",)
    for spec, leaf in zip(jax.tree.leaves(specs), jax.tree.leaves(params), strict=True):
        assert len(spec) == leaf.ndim


def test_round_trip_shapes_and_posterior():
    module = AutoencoderKL(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=3
    )
    x = jax.random.uniform(jax.random.key(1), (2, 8, 12, 3), minval=-1, maxval=1)
    params = jax.jit(module.init)(jax.random.key(0), x)["params"]
    assert module.downscale == 2
    post = _run(module, params, x, "encode")
    assert post.mean.shape == post.logvar.shape == (2, 4, 6, 3)
    np.testing.assert_array_equal(post.mode(), post.mean)
    np.testing.assert_allclose(post.std, np.exp(0.5 * np.asarray(post.logvar)), rtol=1e-6)
    np.testing.assert_allclose(post.var, np.asarray(post.std) ** 2, rtol=1e-5)
    key = jax.random.key(7)
    noise = jax.random.normal(key, post.mean.shape)
    np.testing.assert_allclose(post.sample(key), post.mean + post.std * noise, rtol=1e-6)
    assert not np.allclose(post.sample(key), post.sample(jax.random.key(8)))
    assert post.kl().shape == (2,)
    assert isinstance(post, DiagonalGaussian)  # a pytree: it left a jitted function
    decoded = _run(module, params, post.sample(key), "decode")
    assert decoded.shape == x.shape and decoded.dtype == jnp.float32


def test_logvar_is_clipped_like_diffusers():
    logvar = jnp.array([-100.0, 100.0]) * jnp.ones((1, 2, 2, 2))
    moments = jnp.concatenate([jnp.zeros((1, 2, 2, 2)), logvar], axis=-1)
    post = DiagonalGaussian.from_moments(moments)
    assert float(post.logvar.min()) == LOGVAR_RANGE[0]
    assert float(post.logvar.max()) == LOGVAR_RANGE[1]
    kl_zero = DiagonalGaussian(jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 2))).kl()
    np.testing.assert_allclose(kl_zero, [0.0])


def test_no_quant_convs_means_no_params():
    module, params, _ = _loaded("vae_tiny_noquant")
    assert "quant_conv" not in params and "post_quant_conv" not in params
    module, params, _ = _loaded("vae_tiny_noattn")
    assert "attention" not in params["encoder"]["mid_block"]
    assert "attention" not in params["decoder"]["mid_block"]


def test_bfloat16_compute_stays_close():
    module, params, g = _loaded("vae_tiny", dtype="bfloat16")
    assert module.dtype == jnp.bfloat16
    post = _run(module, params, g["images"], "encode")
    decoded = _run(module, params, g["latents"], "decode")
    assert post.mean.dtype == decoded.dtype == jnp.float32
    assert _rel(post.mean, g["mean"]) < 5e-2
    assert _rel(decoded, g["decoded"]) < 5e-2
    # bf16 parameters too: init creates them in param_dtype.
    small = AutoencoderKL(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
    )
    shapes = jax.eval_shape(small.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(shapes))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
