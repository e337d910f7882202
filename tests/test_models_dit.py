"""Tests for the DiT backbone (tiny sizes; named sizes only through jax.eval_shape)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import LOGICAL_AXES, DiT, create_model, dit_config
from jaxdiff.models.dit import sincos_2d

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
T = jnp.asarray([0.3, -0.7], jnp.float32)
Y = jnp.asarray([1, 4], jnp.int32)
TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)


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


def param_count(model, shape, num_classes=True):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    y = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.unbox(shapes)))


@pytest.fixture(scope="session")
def model():
    return DiT(**TINY, dropout=0.1)


@pytest.fixture(scope="session")
def params(model):
    return random_params(model, X, T, Y)


@pytest.fixture(scope="session")
def apply(model):
    return jax.jit(model.apply, static_argnames=("train", "variant"))


def test_exactly_zero_at_init_in_bf16_with_fp32_params():
    model = DiT(**TINY, dtype=jnp.bfloat16)
    variables, out = jax.jit(lambda k: (v := model.init(k, X, T, Y), model.apply(v, X, T, Y)))(
        key(0)
    )
    assert out.shape == X.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)  # adaLN-Zero + zero final layer
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))


def test_every_param_has_logical_axes(model):
    shapes = jax.eval_shape(model.init, jax.random.key(0), X, T, Y)
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
    specs = jax.tree.leaves(nn.get_partition_spec(shapes), is_leaf=is_spec)
    leaves = jax.tree.leaves(nn.unbox(shapes))
    assert len(specs) == len(leaves) > 0
    for spec, leaf in zip(specs, leaves, strict=True):
        assert len(spec) == leaf.ndim and any(name is not None for name in spec)
        assert all(name is None or name in LOGICAL_AXES for name in spec)


def test_shape_null_class_and_class_dependence(apply, params):
    out = apply(params, X, T, Y)
    assert out.shape == X.shape and out.dtype == jnp.float32
    null = apply(params, X, T, jnp.full((2,), 10, jnp.int32))
    np.testing.assert_allclose(apply(params, X, T, None), null, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, null)
    assert not np.allclose(out, apply(params, X, T + 0.01, Y))


def test_bf16_close_to_fp32(apply, params):
    out = jax.jit(DiT(**TINY, dtype=jnp.bfloat16).apply)(params, X, T, Y)
    ref = apply(params, X, T, Y)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))


def test_dropout_only_in_train(apply, params):
    eval_out = apply(params, X, T, Y)
    a = apply(params, X, T, Y, train=True, rngs={"dropout": key(1)})
    b = apply(params, X, T, Y, train=True, rngs={"dropout": key(2)})
    assert not np.allclose(a, b) and not np.allclose(a, eval_out)


def test_variants_change_output(apply, params):
    base = apply(params, X, T, Y)
    for variant in ("pag", "slg"):
        assert not np.allclose(apply(params, X, T, Y, variant=variant), base), variant
    with pytest.raises(ValueError, match="'stg'.*allowed"):
        apply(params, X, T, Y, variant="stg")
    with pytest.raises(ValueError, match="skip_layers"):
        DiT(**TINY, skip_layers=(5,)).apply(params, X, T, Y, variant="slg")


def test_pag_is_identity_attention_with_one_token(params):
    # With a single token softmax attention is exactly the identity map, so PAG == normal.
    x = X[:, :2, :2]
    f = jax.jit(DiT(**TINY, pag_layers=(0, 1)).apply, static_argnames="variant")
    np.testing.assert_allclose(f(params, x, T, Y, variant="pag"), f(params, x, T, Y), atol=1e-6)


def test_slg_all_blocks_equals_depth_zero(params):
    # Unused params are ignored by linen, so a depth-0 DiT reads the same non-block params.
    slg = functools.partial(DiT(**TINY, skip_layers=(0, -1)).apply, variant="slg")
    empty = DiT(**{**TINY, "depth": 0}).apply
    np.testing.assert_allclose(jax.jit(slg)(params, X, T, Y), jax.jit(empty)(params, X, T, Y))


def test_remat_matches_and_differentiates():
    small = dict(patch_size=4, hidden_size=16, depth=1, num_heads=1)
    plain, remat = DiT(**small), DiT(**small, remat=True)
    params = random_params(plain, X, T)

    def grads(p):
        def loss(m, p):
            return jnp.mean(m.apply(p, X, T) ** 2)

        return jax.grad(functools.partial(loss, plain))(p), jax.grad(
            functools.partial(loss, remat)
        )(p)

    g_plain, g_remat = jax.jit(grads)(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_plain, g_remat
    )


def test_named_sizes_and_param_counts():
    assert dit_config("XL/2") == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    b2 = param_count(DiT.from_name("B/2", num_classes=1000), (2, 32, 32, 4))
    b2_sigma = param_count(DiT.from_name("B/2", num_classes=1000, learn_sigma=True), (2, 32, 32, 4))
    s2 = param_count(create_model("dit-S/2", num_classes=1000), (2, 32, 32, 4))
    # The reference counts (130.5M / 33.0M) add a frozen 256-token position embedding
    # and use the doubled (learn_sigma) output layer.
    assert b2 == 130_303_504
    assert b2_sigma == b2 + 768 * 16 + 16
    assert b2_sigma + 256 * 768 == 130_512_416
    assert s2 == 32_858_896
    assert abs(s2 + 256 * 384 + (384 * 16 + 16) - 33.0e6) < 0.05e6
    with pytest.raises(ValueError, match="bad DiT name"):
        dit_config("M/2")


def test_sincos_position_embedding():
    emb = sincos_2d(4, 2, 8)
    assert emb.shape == (8, 8) and len({tuple(r) for r in emb.round(6)}) == 8
    np.testing.assert_allclose(emb[0], [0, 0, 1, 1, 0, 0, 1, 1])  # token (0, 0)
    # Token 2 is row 1, column 0: the column (0) fills the first half, the row the second,
    # with frequencies 1 and 1/100 for dim 8.
    row1 = [np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01)]
    np.testing.assert_allclose(emb[2], [0, 0, 1, 1, *row1], rtol=1e-6)
    np.testing.assert_allclose(emb[1, :4], row1, rtol=1e-6)  # row 0, column 1


def test_sincos_matches_reference_layout_on_square_grids():
    # The reference (MAE/DiT get_2d_sincos_pos_embed), restated: an "xy" meshgrid, whose
    # first plane is the column index, feeds the first half of the channels.
    g, dim = 5, 32
    planes = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def feats(pos):
        ang = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    ref = np.concatenate([feats(planes[0]), feats(planes[1])], axis=1).astype(np.float32)
    np.testing.assert_array_equal(sincos_2d(g, g, dim), ref)


def test_learn_sigma_doubles_final_layer_and_returns_first_half():
    base = DiT(**TINY)
    sig = DiT(**TINY, learn_sigma=True)
    full = DiT(**TINY, learn_sigma=True, return_all_channels=True)
    params = nn.unbox(random_params(sig, X, T, Y))
    assert params["params"]["final"]["kernel"].shape == (32, 2 * 2 * 8)
    out, all_out = jax.jit(sig.apply)(params, X, T, Y), jax.jit(full.apply)(params, X, T, Y)
    assert out.shape == X.shape and all_out.shape == (*X.shape[:3], 8)
    np.testing.assert_array_equal(out, all_out[..., :4])
    # Reference layout: output feature (i, j, c) of a token is column i * p * 2C + j * 2C + c,
    # so keeping channels c < C of the kernel gives the learn_sigma=False network.
    kernel = params["params"]["final"]["kernel"].reshape(32, 2, 2, 8)[..., :4]
    bias = params["params"]["final"]["bias"].reshape(2, 2, 8)[..., :4]
    small = {"params": dict(params["params"])}
    small["params"]["final"] = {"kernel": kernel.reshape(32, 16), "bias": bias.reshape(16)}
    np.testing.assert_allclose(jax.jit(base.apply)(small, X, T, Y), out, rtol=1e-6, atol=1e-6)
