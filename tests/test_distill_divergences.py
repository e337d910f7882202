"""f-divergence weightings: the gradient theorem on 1-D Gaussians and the normalisations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.distill.divergences import DIVERGENCES, generator_f, weighting
from jaxdiff.distill.ratio import density_ratio, f_weights, time_bin_normalize

KINDS = [*DIVERGENCES, "alpha:0.3"]


def _log_normal(x, mu):
    return -0.5 * (x - mu) ** 2 - 0.5 * jnp.log(2 * jnp.pi)


def _quadrature_grad(kind, mu):
    """d/dmu of D_f(p || q_mu) = int q_mu f(p / q_mu), p = N(0, 1), q_mu = N(mu, 1)."""
    x = jnp.linspace(-14.0, 14.0, 40001)
    dx = x[1] - x[0]
    f = generator_f(kind)

    def d_f(m):
        log_q = _log_normal(x, m)
        return jnp.sum(jnp.exp(log_q) * f(jnp.exp(_log_normal(x, 0.0) - log_q))) * dx

    return float(jax.grad(d_f)(jnp.float32(mu)))


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_theorem_matches_quadrature(kind):
    # grad D_f = E_q[h(r) (s_q - s_p) dx/dmu] with x = mu + z, dx/dmu = 1 and r = p / q.
    mu, n = 1.0, 400_000
    x = mu + jax.random.normal(jax.random.key(0), (n,))
    r = jnp.exp(_log_normal(x, 0.0) - _log_normal(x, mu))
    s_q, s_p = -(x - mu), -x
    terms = np.asarray(weighting(kind)(r) * (s_q - s_p), np.float64)
    mc, se = terms.mean(), terms.std() / np.sqrt(n)
    exact = _quadrature_grad(kind, mu)
    assert abs(mc - exact) < 4 * se + 2e-3, (kind, mc, exact, se)


def test_gradient_values_from_the_spec():
    expected = {"fkl": 1.000, "srkl": 0.602, "js": 0.398, "sh": 0.221, "rkl": 1.0}
    for kind, value in expected.items():
        assert _quadrature_grad(kind, 1.0) == pytest.approx(value, abs=2e-3), kind


def test_alpha_family_limits():
    r = jnp.linspace(0.1, 5.0, 7)
    np.testing.assert_allclose(weighting("alpha:0")(r), weighting("rkl")(r))
    np.testing.assert_allclose(weighting("alpha:1")(r), weighting("fkl")(r))
    np.testing.assert_allclose(weighting("alpha:0.5")(r), 4 * weighting("sh")(r), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown divergence"):
        weighting("tv")


@pytest.mark.parametrize("kind", KINDS)
def test_normalised_weights_have_mean_one(kind):
    logits = 3.0 * jax.random.normal(jax.random.key(1), (257,))
    h = f_weights(density_ratio(logits), kind)
    assert h.dtype == jnp.float32
    assert float(jnp.mean(h)) == pytest.approx(1.0, abs=1e-5)


def test_reverse_kl_weights_are_exactly_one():
    h = f_weights(density_ratio(jax.random.normal(jax.random.key(2), (64,))), "rkl")
    np.testing.assert_array_equal(h, np.ones(64, np.float32))


def test_density_ratio_clips_in_fp32():
    r = density_ratio(jnp.asarray([-50.0, 0.0, 50.0], jnp.bfloat16))
    assert r.dtype == jnp.float32
    np.testing.assert_allclose(r, [0.1, 1.0, 20.0], rtol=1e-6)
    # Several heads: mean over the leading axis first.
    np.testing.assert_allclose(density_ratio(jnp.asarray([[0.0], [2.0]])), [np.e], rtol=1e-6)


def test_time_bin_normalisation():
    key_t, key_r = jax.random.split(jax.random.key(3))
    t = jax.random.uniform(key_t, (4000,))
    r = jnp.exp(jax.random.normal(key_r, (4000,))) * (1.0 + 5.0 * t)  # bias grows with t
    r_n, means = time_bin_normalize(r, t, jnp.ones(10))
    bins = np.minimum((np.asarray(t) * 10).astype(int), 9)
    for b in range(10):
        assert np.mean(np.asarray(r_n)[bins == b]) == pytest.approx(1.0, abs=1e-4)
    # EMA: an empty bin keeps its old mean; a filled one moves by (1 - ema).
    old = jnp.arange(1.0, 11.0)
    _, new = time_bin_normalize(jnp.asarray([3.0]), jnp.asarray([0.05]), old, ema=0.5)
    np.testing.assert_allclose(new, old.at[0].set(0.5 * 1.0 + 0.5 * 3.0))
