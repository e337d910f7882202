"""Tests for the residual MLP backbone used on 2-D toy data."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import LOGICAL_AXES, MLP

X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 2)), jnp.float32)
T = jnp.asarray([0.0, 0.25, 0.5, 1.0], jnp.float32)
Y = jnp.asarray([0, 1, 2, 1], jnp.int32)
SMALL = dict(features=32, depth=3, num_classes=3, dropout=0.2)


def key(seed):
    # XLA:CPU compiles threefry slowly (about a second per distinct random shape);
    # the counter-based "unsafe_rbg" generator compiles several times faster.
    return jax.random.key(seed, impl="unsafe_rbg")


@pytest.fixture(scope="session")
def model():
    return MLP(**SMALL, zero_init_output=False)


@pytest.fixture(scope="session")
def variables(model):
    return jax.jit(model.init)(key(0), X, T, Y)


@pytest.fixture(scope="session")
def apply(model):
    return jax.jit(model.apply, static_argnames=("train", "variant"))


def test_zero_init_output_and_bf16():
    model = MLP(**SMALL, dtype=jnp.bfloat16)
    variables, out = jax.jit(lambda k: (v := model.init(k, X, T), model.apply(v, X, T)))(key(0))
    assert out.shape == X.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))


def test_shape_classes_and_null_class(apply, variables):
    out = apply(variables, X, T, Y)
    assert out.shape == X.shape and out.dtype == jnp.float32
    null = apply(variables, X, T, jnp.full((4,), 3, jnp.int32))
    np.testing.assert_allclose(apply(variables, X, T, None), null, rtol=1e-6)
    assert not np.allclose(out, null)
    # A small change of t in [0, 1] must be visible through the embedding.
    assert not np.allclose(out, apply(variables, X, T + 1e-3, Y))


def test_dropout_only_in_train(apply, variables):
    eval_out = apply(variables, X, T, Y)
    a = apply(variables, X, T, Y, train=True, rngs={"dropout": key(1)})
    b = apply(variables, X, T, Y, train=True, rngs={"dropout": key(2)})
    assert not np.allclose(a, b) and not np.allclose(a, eval_out)


def test_variants(apply, variables):
    slg = apply(variables, X, T, Y, variant="slg")
    assert not np.allclose(slg, apply(variables, X, T, Y))
    all_skipped = jax.jit(
        functools.partial(MLP(**SMALL, skip_layers=(0, 1, 2)).apply, variant="slg")
    )(variables, X, T, Y)
    empty = jax.jit(MLP(**{**SMALL, "depth": 0}).apply)(variables, X, T, Y)
    np.testing.assert_allclose(all_skipped, empty, rtol=1e-6)
    with pytest.raises(ValueError, match="pag"):
        apply(variables, X, T, Y, variant="pag")
    with pytest.raises(ValueError, match="allowed"):
        apply(variables, X, T, Y, variant="bogus")


def test_every_param_has_logical_axes(variables):
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
    specs = jax.tree.leaves(nn.get_partition_spec(variables), is_leaf=is_spec)
    assert len(specs) == len(jax.tree.leaves(nn.unbox(variables)))
    for spec in specs:
        assert spec and all(name in LOGICAL_AXES for name in spec)


def test_fourier_embedding_and_scalar_label(variables):
    model = MLP(**SMALL, embedding="fourier", zero_init_output=False)
    out = jax.jit(model.apply)(variables, X, jnp.float32(0.5), Y)
    assert out.shape == X.shape and bool(jnp.all(jnp.isfinite(out)))
