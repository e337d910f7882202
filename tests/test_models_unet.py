"""Tests for the U-Net backbone (tiny widths: XLA compile time dominates on CPU)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.diffusion import EDM
from jaxdiff.models import LOGICAL_AXES, UNet
from jaxdiff.training import create_train_state, make_loss_fn, make_train_step

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
T = jnp.asarray([0.3, -0.7], jnp.float32)
Y = jnp.asarray([1, 4], jnp.int32)
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_classes=10)
AUG = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9)), jnp.float32)
SMALL = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_classes=10, dropout=0.0)
"""A U-Net small enough to differentiate quickly on CPU (augmentation tests)."""
FAST_COMPILE = {"xla_backend_optimization_level": 0}
"""XLA:CPU options for tests of data flow, not speed: compiles 2-3x faster."""


def key(seed):
    # XLA:CPU compiles threefry slowly (about a second per distinct random shape);
    # the counter-based "unsafe_rbg" generator compiles several times faster.
    return jax.random.key(seed, impl="unsafe_rbg")


def random_params(model, *args, scale=0.1, seed=0):
    """Non-zero params without running the (slow-to-compile) random initialisers."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) * scale, s.dtype), shapes
    )


@pytest.fixture(scope="session")
def model():
    return UNet(**TINY)


@pytest.fixture(scope="session")
def params(model):
    return random_params(model, X, T, Y)


@pytest.fixture(scope="session")
def apply(model):
    # One jitted function for the whole module: each distinct (cond-is-None, train,
    # variant) traces once, keeping the number of CPU compiles small.
    return jax.jit(model.apply, static_argnames=("train", "variant"))


def test_zero_at_init_in_bf16_with_fp32_params():
    # A real random init (slow to compile on CPU), so on a small configuration.
    model = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dtype=jnp.bfloat16)
    variables, out = jax.jit(lambda k: (v := model.init(k, X, T), model.apply(v, X, T)))(key(0))
    assert out.shape == X.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised output conv
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))


def test_every_param_has_logical_axes(model):
    shapes = jax.eval_shape(model.init, jax.random.key(0), X, T, Y)
    specs = jax.tree.leaves(
        nn.get_partition_spec(shapes), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)
    )
    leaves = jax.tree.leaves(nn.unbox(shapes))
    assert len(specs) == len(leaves) > 0
    for spec, leaf in zip(specs, leaves, strict=True):
        assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) == leaf.ndim
        assert all(name is None or name in LOGICAL_AXES for name in spec)
        assert any(name is not None for name in spec)


def test_null_class_and_class_dependence(apply, params):
    out = apply(params, X, T, Y)
    assert out.shape == X.shape and out.dtype == jnp.float32
    null = apply(params, X, T, jnp.full((2,), 10, jnp.int32))
    np.testing.assert_allclose(apply(params, X, T, None), null, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, null)
    assert not np.allclose(out, apply(params, X, T + 0.01, Y))  # noise label matters


def test_dropout_only_in_train(apply, params):
    eval_out = apply(params, X, T, Y)
    np.testing.assert_array_equal(eval_out, apply(params, X, T, Y, train=False))
    a = apply(params, X, T, Y, train=True, rngs={"dropout": key(1)})
    b = apply(params, X, T, Y, train=True, rngs={"dropout": key(2)})
    assert not np.allclose(a, b) and not np.allclose(a, eval_out)


def test_variants(apply, params):
    base = apply(params, X, T, Y)
    out = apply(params, X, T, Y, variant="slg")
    assert out.shape == X.shape and not np.allclose(out, base)
    with pytest.raises(ValueError, match="'cfg'.*allowed"):
        apply(params, X, T, Y, variant="cfg")


def test_pag_static_under_closure_jit(model, apply, params):
    pag = jax.jit(functools.partial(model.apply, variant="pag"))(params, X, T, Y)
    assert pag.shape == X.shape and not np.allclose(pag, apply(params, X, T, Y))


def test_variant_layers_selectable(apply, params):
    # Also skipping the 4-pixel attention layers (default: only "mid") changes the output.
    mid = apply(params, X, T, Y, variant="slg")
    both = jax.jit(functools.partial(UNet(**TINY, skip_layers=(4, "mid")).apply, variant="slg"))
    assert not np.allclose(mid, both(params, X, T, Y))
    with pytest.raises(ValueError, match="pag_layers"):
        UNet(**TINY, pag_layers=(8,)).apply(params, X, T, Y, variant="pag")


@pytest.mark.parametrize("extra", [dict(resample="avgpool", embedding="fourier"), dict(head_dim=8)])
def test_options_and_cifar_shapes(extra):
    model = UNet(ch=16, ch_mult=(1, 2, 2), attn_resolutions=(16,), **extra)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    out = jax.eval_shape(
        lambda k, x, t: model.apply(model.init(k, x, t), x, t), jax.random.key(0), x, t
    )
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_bad_configs():
    t = jnp.zeros((1,))
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(UNet(ch_mult=(1, 2, 2)).init, jax.random.key(0), jnp.zeros((1, 6, 6, 1)), t)
    with pytest.raises(ValueError, match="resample"):
        jax.eval_shape(UNet(resample="x").init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), t)


def test_augment_labels_enter_the_embedding():
    model = UNet(**SMALL, augment_dim=9)
    params = random_params(model, X, T, Y)  # init without labels still creates the mapping
    assert params["params"]["augment_embed"]["kernel"].value.shape == (9, 4 * SMALL["ch"])
    assert "bias" not in params["params"]["augment_embed"]
    plain = {"params": {k: v for k, v in params["params"].items() if k != "augment_embed"}}

    def outputs(params, plain):
        return (
            model.apply(params, X, T, Y),
            model.apply(params, X, T, Y, augment_label=jnp.zeros_like(AUG)),
            model.apply(params, X, T, Y, augment_label=AUG),
            UNet(**SMALL).apply(plain, X, T, Y),
        )

    # One compile for all four networks.
    compiled = jax.jit(outputs).lower(params, plain).compile(FAST_COMPILE)
    absent, zero, labelled, without = compiled(params, plain)
    # Zero labels = no labels (sampling) = the same network built without augment_dim.
    np.testing.assert_array_equal(zero, absent)
    np.testing.assert_array_equal(without, absent)
    assert not np.allclose(labelled, absent)


def test_augment_label_mismatch_is_a_clear_error(params):
    with pytest.raises(ValueError, match="augment_dim=0.*augment_dim=9"):
        jax.eval_shape(lambda: UNet(**TINY).apply(params, X, T, Y, augment_label=AUG))
    model = UNet(**SMALL, augment_dim=4)
    shapes = jax.eval_shape(model.init, jax.random.key(0), X, T, Y)
    with pytest.raises(ValueError, match=r"shape \(2, 9\), expected \(2, augment_dim=4\)"):
        jax.eval_shape(lambda v: model.apply(v, X, T, Y, augment_label=AUG), shapes)
    loss_fn = make_loss_fn(UNet(**TINY), EDM(), num_classes=10, label_dropout=0.0)
    batch = {"image": X, "label": Y, "augment_label": AUG}
    with pytest.raises(ValueError, match="'augment_label'.*set the model's augment_dim"):
        jax.eval_shape(loss_fn, params["params"], batch, jax.random.key(0))


def test_train_step_feeds_augment_labels_to_the_mapping():
    model = UNet(**SMALL, augment_dim=9)
    params = nn.unbox(random_params(model, X, T, Y))["params"]
    state = create_train_state(params, optax.sgd(1.0), ema_rates=(0.9,))
    step = make_train_step(model, EDM(), optax.sgd(1.0), num_classes=10)
    batch = {"image": X, "label": Y, "augment_label": AUG}
    compiled = jax.jit(step).lower(state, batch, key(0)).compile(FAST_COMPILE)
    new, metrics = compiled(state, batch, key(0))
    assert np.isfinite(metrics["loss"]) and int(new.step) == 1
    kernel = params["augment_embed"]["kernel"]
    moved = np.abs(new.params["augment_embed"]["kernel"] - kernel)
    assert moved.min() > 0  # every weight of the mapping got a gradient
