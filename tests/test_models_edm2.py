"""Tests for EDM2's magnitude-preserving U-Net (tiny widths; parity is in test_pretrained_edm2)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.diffusion import EDM
from jaxdiff.models import LOGICAL_AXES
from jaxdiff.models.edm2 import (
    EDM2_CONFIGS,
    EDM2UNet,
    force_weight_norm,
    trainable_mask,
    uncertainty_loss,
)
from jaxdiff.models.edm2_layers import (
    MPConv,
    MPFourier,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    resample,
)
from jaxdiff.training import make_loss_fn

TINY = dict(
    img_resolution=8,
    num_classes=10,
    model_channels=8,
    channel_mult=(1, 2),
    num_blocks=1,
    attn_resolutions=(4,),
    channels_per_head=4,
    logvar_channels=8,
)
X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
T = jnp.asarray([0.3, -0.7], jnp.float32)
Y = jnp.asarray([1, 4], jnp.int32)


def random_params(model, seed=0, weight_scale=(1.0, 1.0), boxed=False):
    """Params without running the (slow-to-compile) initialisers, every gain non-zero.

    MPConv weights are ``N(0, s^2)`` with one ``s ~ U(weight_scale)`` per layer (EDM2
    initialises with s = 1; the forward pass normalises them anyway).
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), X, T, Y)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key if hasattr(path[-1], "key") else path[-2].key  # boxed: .value
        if name.endswith("gain"):
            return jnp.asarray(rng.uniform(0.5, 1.5), s.dtype)
        if name == "phases":
            return jnp.asarray(rng.uniform(0, 2 * np.pi, s.shape), s.dtype)
        scale = 2 * np.pi if name == "freqs" else rng.uniform(*weight_scale)
        return jnp.asarray(rng.standard_normal(s.shape) * scale, s.dtype)

    out = jax.tree_util.tree_map_with_path(fill, shapes)
    return out if boxed else nn.unbox(out)


@pytest.fixture(scope="session")
def model():
    return EDM2UNet(**TINY)


@pytest.fixture(scope="session")
def params(model):
    return random_params(model)


@pytest.fixture(scope="session")
def apply(model):
    # One jitted apply per call signature: XLA:CPU compiles the whole net faster than
    # eager mode compiles its ops one by one.
    return jax.jit(model.apply, static_argnames=("train", "variant", "return_logvar"))


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_mp_ops_preserve_magnitude():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((4096, 16)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4096, 48)), jnp.float32)
    rms = lambda v: float(jnp.sqrt(jnp.mean(v**2)))  # noqa: E731  (0.596 is silu's RMS)
    assert abs(rms(mp_silu(a)) - 1) < 0.05
    assert abs(rms(mp_sum(a, b[:, :16], 0.3)) - 1) < 0.05
    cat = mp_cat(a, b, 0.5)
    assert cat.shape == (4096, 64) and abs(rms(cat) - 1) < 0.05
    # t balances the two inputs whatever their widths: each half carries half the energy.
    assert abs(float(jnp.sum(cat[:, :16] ** 2) / jnp.sum(cat[:, 16:] ** 2)) - 1) < 0.05
    n = normalize(a * 7.0, -1)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(n**2, -1)), 1.0, atol=1e-3)


def test_resample_box_filter_is_average_pool_and_nearest():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 3)), jnp.float32)
    down = resample(x, (1, 1), "down")
    np.testing.assert_allclose(down, nn.avg_pool(x, (2, 2), (2, 2)), atol=1e-6)
    up = resample(x, (1, 1), "up")
    np.testing.assert_allclose(up, jnp.repeat(jnp.repeat(x, 2, 1), 2, 2), atol=1e-6)
    assert resample(x, (1, 3, 3, 1), "up").shape == (2, 16, 16, 3)
    assert resample(x, (1, 3, 3, 1), "down").shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="even length"):
        resample(x, (1, 2, 1), "down")


def test_initialisers():
    key = jax.random.key(0, impl="unsafe_rbg")
    fourier = MPFourier(64).init(key, T)["params"]
    freqs, phases = nn.unbox(fourier["freqs"]), nn.unbox(fourier["phases"])
    assert freqs.shape == phases.shape == (64,)
    assert 3 < float(jnp.std(freqs)) < 10  # 2 pi N(0, 1)
    assert 0 <= float(phases.min()) and float(phases.max()) < 2 * np.pi
    conv = nn.unbox(MPConv(8, (3, 3)).init(key, X)["params"]["weight"])
    assert conv.shape == (3, 3, 3, 8) and 0.7 < float(jnp.std(conv)) < 1.3


def test_shapes_logvar_and_axes(model, params, apply):
    boxed = jax.eval_shape(model.init, jax.random.key(0), X, T, Y)
    specs = nn.get_partition_spec(boxed)["params"]
    for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)):
        assert all(a is None or a in LOGICAL_AXES for a in spec)
    p = nn.unbox(boxed)["params"]
    assert p["enc_8x8_conv"]["weight"].shape == (3, 3, 4, 8)  # HWIO, with the ones channel
    assert p["emb_label"]["weight"].shape == (10, 16)
    assert p["out_gain"].shape == () and p["enc_8x8_block0"]["emb_gain"].shape == ()
    assert "attn_qkv" in p["enc_4x4_block0"] and "attn_qkv" in p["dec_4x4_in0"]
    assert "attn_qkv" not in p["enc_8x8_block0"] and "attn_qkv" not in p["dec_4x4_in1"]
    out, logvar = apply({"params": params}, X, T, Y, return_logvar=True)
    assert out.shape == X.shape and out.dtype == jnp.float32 and logvar.shape == (2,)
    zero_gain = {**params, "out_gain": jnp.zeros(())}
    np.testing.assert_array_equal(apply({"params": zero_gain}, X, T, Y), 0.0)  # as at init


def test_labels_int_onehot_and_null(params, apply):
    f_int = apply({"params": params}, X, T, Y)
    f_hot = apply({"params": params}, X, T, jax.nn.one_hot(Y, 10))
    np.testing.assert_allclose(f_int, f_hot, atol=1e-6)
    f_none = apply({"params": params}, X, T, None)
    f_null = apply({"params": params}, X, T, jnp.full((2,), 10))  # jaxdiff's null class id
    np.testing.assert_allclose(f_none, f_null, atol=1e-6)
    assert rel(f_none, f_int) > 1e-3


def test_force_weight_norm_idempotent_and_output_invariant(model, apply):
    params = random_params(model, seed=1, weight_scale=(0.3, 3.0))
    forced = force_weight_norm(params)
    again = force_weight_norm(forced)
    third = force_weight_norm(again)
    trees = (params, forced, again, third)
    for w0, w1, w2, w3 in zip(*(jax.tree.leaves(t) for t in trees), strict=True):
        assert w1.shape == w0.shape and w1.dtype == w0.dtype
        # EDM2's normalize has a fixed point at RMS 1 - 1e-4: from RMS s it lands at
        # 1 - 1e-4 / s, so a repeat moves the weights by ~1e-4 / s (s >= 0.3 here), and the
        # next one by float32 rounding only.
        np.testing.assert_allclose(w2, w1, rtol=5e-4, atol=1e-7)
        np.testing.assert_allclose(w3, w2, rtol=1e-6, atol=1e-7)
    w = forced["enc_4x4_block0"]["conv_res0"]["weight"]
    rms = jnp.sqrt(jnp.mean(w.reshape(-1, w.shape[-1]) ** 2, axis=0))
    np.testing.assert_allclose(rms, 1.0, atol=1e-3)
    assert forced["out_gain"] == params["out_gain"]
    assert forced["dec_4x4_in0"]["emb_gain"] == params["dec_4x4_in0"]["emb_gain"]
    np.testing.assert_array_equal(forced["emb_fourier"]["freqs"], params["emb_fourier"]["freqs"])
    a, la = apply({"params": params}, X, T, Y, return_logvar=True)
    b, lb = apply({"params": forced}, X, T, Y, return_logvar=True)
    c, lc = apply({"params": again}, X, T, Y, return_logvar=True)
    # The forward pass normalises every weight itself; only EDM2's 1e-4 epsilon sees the
    # stored scale (weights scaled by 0.3..3 here: a few 1e-4 over the whole net).
    assert rel(b, a) < 2e-3 and rel(lb, la) < 2e-3
    assert rel(c, b) < 1e-5 and rel(lc, lb) < 1e-5
    boxed = jax.jit(force_weight_norm)(random_params(model, boxed=True))
    assert isinstance(boxed["out_conv"]["weight"], nn.Partitioned)


def test_trainable_mask(params):
    mask = trainable_mask(params)
    assert mask["emb_fourier"] == {"freqs": False, "phases": False}
    assert mask["logvar_fourier"] == {"freqs": False, "phases": False}
    assert mask["out_gain"] and mask["enc_8x8_conv"]["weight"]
    assert sum(not m for m in jax.tree.leaves(mask)) == 4


@pytest.mark.slow  # 38 s: the EDM2 loss is tested in test_uncertainty_loss
def test_one_train_step_through_jaxdiff_loss():
    model = EDM2UNet(**{**TINY, "dropout": 0.1})
    params = random_params(model)
    loss_fn = make_loss_fn(model, EDM(sigma_data=0.5), num_classes=10, label_dropout=0.1)
    batch = {"image": X, "label": Y}
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, _), grads = step(params, batch, jax.random.key(2))
    assert np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["emb_noise"]["weight"]).max()) > 0
    assert float(jnp.abs(grads["dec_8x8_block1"]["conv_res1"]["weight"]).max()) > 0
    # The fixed Fourier constants get exactly zero gradient, so Adam leaves them alone.
    np.testing.assert_array_equal(grads["emb_fourier"]["freqs"], 0.0)
    np.testing.assert_array_equal(grads["emb_fourier"]["phases"], 0.0)
    tx = optax.adam(1e-2)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = force_weight_norm(optax.apply_updates(params, updates))
    np.testing.assert_array_equal(new["emb_fourier"]["freqs"], params["emb_fourier"]["freqs"])
    (loss2, _), _ = step(new, batch, jax.random.key(2))
    assert np.isfinite(float(loss2)) and float(loss2) != float(loss)


def test_uncertainty_loss():
    # One level (blocks enc0, in0 with attention, in1, dec0, dec1): a quicker backward pass.
    model = EDM2UNet(**{**TINY, "channel_mult": (1,), "attn_resolutions": ()})
    params = random_params(model)
    formulation = EDM(sigma_data=0.5, p_mean=-0.4, p_std=1.0)

    def loss(p, key):
        net = lambda x, c, y: model.apply({"params": p}, x, c, y, return_logvar=True)  # noqa: E731
        return uncertainty_loss(formulation, net, X, key, Y)

    key = jax.random.key(3)
    per_example, vjp = jax.vjp(jax.jit(loss), params, key)
    assert per_example.shape == (2,)
    grads = vjp(jnp.ones((2,)))[0]
    assert float(jnp.abs(grads["logvar_linear"]["weight"]).max()) > 0
    np.testing.assert_array_equal(grads["logvar_fourier"]["freqs"], 0.0)
    # With logvar = 0 it is the formulation's own loss for the same draw.
    zero = {
        **params,
        "logvar_linear": {"weight": jnp.zeros_like(params["logvar_linear"]["weight"])},
    }
    plain = formulation.loss(lambda x, c, y: model.apply({"params": params}, x, c, y), X, key, Y)
    np.testing.assert_allclose(jax.jit(loss)(zero, key), plain, rtol=1e-5)


def test_variants(params, apply):
    base = apply({"params": params}, X, T, Y)
    for variant in ("pag", "slg"):
        out = apply({"params": params}, X, T, Y, variant=variant)
        assert out.shape == base.shape and rel(out, base) > 1e-4
    wide = EDM2UNet(**{**TINY, "pag_layers": ("mid", 4)})
    pag = wide.apply({"params": params}, X, T, Y, variant="pag")
    assert rel(pag, apply({"params": params}, X, T, Y, variant="pag")) > 1e-4
    with pytest.raises(ValueError, match="unknown variant"):
        apply({"params": params}, X, T, Y, variant="bogus")
    with pytest.raises(ValueError, match="pag_layers"):
        EDM2UNet(**{**TINY, "pag_layers": (8,)}).apply({"params": params}, X, T, Y, variant="pag")
    with pytest.raises(ValueError, match="img_resolution=8"):
        apply({"params": params}, jnp.zeros((1, 16, 16, 3)), T[:1], Y[:1])


@pytest.mark.parametrize(
    "name,count", [("img512-xs", 124_713_253), ("img512-s", 280_212_837), ("img64-s", 280_209_381)]
)
def test_config_param_counts_match_upstream(name, count):
    # Counts of NVlabs/edm2's Precond (UNet + logvar head) built with the same presets.
    cfg = EDM2_CONFIGS[name]
    c = 4 if name.startswith("img512") else 3
    model = EDM2UNet(**cfg)
    x = jnp.zeros((1, 64, 64, c))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros((1,), int))
    mask = trainable_mask(nn.unbox(shapes))  # the Fourier constants are buffers upstream
    sizes = jax.tree.map(lambda s, m: int(np.prod(s.shape)) * m, nn.unbox(shapes), mask)
    assert sum(jax.tree.leaves(sizes)) == count
