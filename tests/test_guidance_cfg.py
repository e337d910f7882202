"""CFG and the Guidance protocol on exact class-conditional Gaussian denoisers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import EDM, VPEpsilon, VPrediction, expand_to, karras_sigmas
from jaxdiff.guidance import (
    CFG,
    Guidance,
    NoGuidance,
    StepCtx,
    cfg,
    eval_branches,
    from_ho_salimans,
    to_ho_salimans,
)
from jaxdiff.samplers import dpmpp_2m, heun, per_sample_normal, sample

NULL = 3  # classes 0..2, null class id 3
MEANS = jnp.array([-2.0, 0.0, 2.0, 0.5])  # row NULL: the "unconditional" Gaussian's mean
STD = 0.5


def class_denoiser(calls=None):
    """Exact denoiser of x0 ~ N(MEANS[c], STD^2); counts its calls and batch sizes."""

    def d(x, sigma, cond):
        if calls is not None:
            calls.append(x.shape[0])
        mu = expand_to(MEANS[cond], x)
        return mu + STD**2 / (STD**2 + expand_to(sigma, x) ** 2) * (x - mu)

    return d


def _ctx(sigma, b):
    keys = jax.random.split(jax.random.key(0), b)
    return StepCtx(jnp.int32(0), jnp.float32(sigma), jnp.float32(0.0), keys, 1)


def test_w1_is_conditional_and_w0_unconditional():
    x = jax.random.normal(jax.random.key(0), (6, 3))
    c = jnp.array([0, 1, 2, 0, 1, 2])
    u = jnp.full((6,), NULL)
    den = class_denoiser()
    sig = jnp.full((6,), 1.3)
    out1, _ = cfg(1.0)(den, x, _ctx(1.3, 6), c, u, ())
    out0, _ = cfg(0.0)(den, x, _ctx(1.3, 6), c, u, ())
    np.testing.assert_allclose(out1.x0, den(x, sig, c), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out0.x0, den(x, sig, u), rtol=1e-6, atol=1e-6)
    assert out1.nfe == 2


def test_cfg_uses_one_2b_call():
    calls = []
    x = jnp.zeros((5, 2))
    cfg(3.0)(class_denoiser(calls), x, _ctx(1.0, 5), jnp.zeros(5, int), jnp.full(5, NULL), ())
    assert calls == [10]


@pytest.mark.parametrize("form", [EDM(), VPEpsilon(), VPrediction()], ids=["edm", "eps", "v"])
def test_cfg_identical_in_x0_eps_and_v_space(form):
    # Combine the networks' raw outputs (eps or v) with the CFG rule, wrap once, and compare
    # with CFG on the x0 estimates: equal because CFG's weights sum to one.
    w = 2.7
    x = jax.random.normal(jax.random.key(1), (4, 3)) * 2.0
    sigma = jnp.array([0.2, 0.9, 3.0, 11.0])
    c, u = jnp.array([0, 1, 2, 1]), jnp.full((4,), NULL)

    def net(x_in, c_noise, cond):  # a non-trivial network: not the exact target
        return jnp.tanh(x_in + MEANS[cond][:, None]) * (1.0 + c_noise[:, None] / 1000.0)

    f_c = lambda *a: net(*a[:2], c)  # noqa: E731
    f_u = lambda *a: net(*a[:2], u)  # noqa: E731
    combined = lambda xi, cn, _: f_u(xi, cn) + w * (f_c(xi, cn) - f_u(xi, cn))  # noqa: E731
    in_net_space = form.denoise(combined, x, sigma)
    d = form.as_denoiser(net)
    out, _ = cfg(w)(d, x, StepCtx(0, sigma, 0.0, None, 1), c, u, ())
    np.testing.assert_allclose(out.x0, in_net_space, rtol=1e-5, atol=1e-5)


def test_cfg_samples_tempered_gaussian_exactly():
    # For Gaussians with a shared std, CFG with scale w at every sigma is still a Gaussian
    # denoiser with mean mu_u + w (mu_c - mu_u); the sampler's final mean must match it.
    w = 2.0
    b = 2
    c, u = jnp.array([0, 2]), jnp.full((b,), NULL)
    x, aux = jax.jit(
        lambda n: sample(
            class_denoiser(),
            n,
            karras_sigmas(128),
            solver=heun(),
            guidance=cfg(w),
            cond=c,
            uncond=u,
        )
    )(jnp.zeros((b, 1)))
    expected = MEANS[u] + w * (MEANS[c] - MEANS[u])
    r = np.sqrt(STD**2 + 80.0**2)
    np.testing.assert_allclose(x[:, 0], expected * (1 - STD / r), atol=2e-3)
    assert int(aux["nfe"]) == 2 * (2 * 128 - 1)


def test_per_sample_scales_sweep_compiles_once():
    scales = jnp.linspace(1.0, 4.5, 8)
    c, u = jnp.zeros(8, int), jnp.full((8,), NULL)
    noise = per_sample_normal(jax.random.key(0), (8, 2))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(noise, scale):
        return sample(
            class_denoiser(),
            noise,
            karras_sigmas(10),
            solver=dpmpp_2m(),
            guidance=CFG(scale),
            cond=c,
            uncond=u,
        )[0]

    sweep = run(noise, scales)
    for j in (0, 5):
        single = run(noise, jnp.full((8,), scales[j]))
        np.testing.assert_allclose(sweep[j], single[j], rtol=1e-5, atol=1e-5)
    chex.clear_trace_counter()


def test_ho_salimans_conversion_and_protocol():
    assert float(from_ho_salimans(1.0)) == 2.0 and float(to_ho_salimans(2.0)) == 1.0
    assert isinstance(cfg(2.0), Guidance) and isinstance(NoGuidance(), Guidance)


def test_cfg_without_uncond_is_a_clear_error():
    with pytest.raises(ValueError, match="uncond"):
        sample(
            class_denoiser(),
            jnp.zeros((2, 1)),
            karras_sigmas(3),
            solver=heun(),
            guidance=cfg(2.0),
            cond=jnp.zeros(2, int),
        )
    with pytest.raises(ValueError, match="None"):
        eval_branches(class_denoiser(), jnp.zeros((2, 1)), 1.0, (None, None))


def test_cfg_inside_sharded_jit_on_8_devices():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    noise = jax.device_put(per_sample_normal(jax.random.key(1), (16, 2)), shard)
    c = jax.device_put(jnp.arange(16) % 3, shard)
    u = jax.device_put(jnp.full((16,), NULL), shard)
    fn = jax.jit(
        lambda n, c, u: sample(
            class_denoiser(),
            n,
            karras_sigmas(6),
            solver=heun(),
            guidance=cfg(2.0),
            cond=c,
            uncond=u,
        )[0],
        out_shardings=shard,
    )
    out = fn(noise, c, u)
    single = fn(np.asarray(noise), np.asarray(c), np.asarray(u))
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(out, single, rtol=1e-6, atol=1e-6)
