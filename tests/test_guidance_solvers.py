"""Guidance meets solvers: CFG++'s re-noising estimate and float64 runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import denoiser
from mixture import denoiser as mixture_denoiser
from mixture import points

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance import ag, apg, cfg, cfgpp, interval, within_interval
from jaxdiff.samplers import (
    SOLVERS,
    batch_keys,
    dpmpp_2m,
    edm_stochastic,
    euler,
    euler_ancestral,
    get_solver,
    heun,
    per_sample_normal,
    sample,
    step_keys,
)

DEN = denoiser()
MIX = mixture_denoiser()


def _step_noise(key, b, shape, i=0):
    """The fresh noise a solver draws at step ``i``: its step keys, then ``normal_like``."""
    keys = step_keys(batch_keys(key, b), i)[0]
    return np.asarray(jax.vmap(lambda k: jax.random.normal(k, shape))(keys))


def _guided_den():
    """A denoiser whose cond (1) and uncond (0) outputs differ (for CFG++ tests)."""

    def d(x, sigma, cond):
        shift = jnp.where(cond == 1, 0.4, -0.3)[:, None]
        return DEN(x, sigma) + shift

    return d


def test_euler_ancestral_honours_cfgpp_renoise():

    b, lam, eta = 6, 0.6, 0.7
    c, u = jnp.ones((b,), jnp.int32), jnp.zeros((b,), jnp.int32)
    den = _guided_den()
    sig = np.array([1.5, 0.7], np.float32)
    noise = per_sample_normal(jax.random.key(1), (b, 3))
    key = jax.random.key(3)
    kw = dict(cond=c, uncond=u, key=key)
    x1, _ = sample(den, noise, sig, solver=euler_ancestral(eta), guidance=cfgpp(lam), **kw)
    plain, _ = sample(den, noise, sig, solver=euler_ancestral(eta), guidance=cfg(lam), **kw)
    # k-diffusion's CFG++ Euler ancestral: x0 + sigma_down (x - D_u) / sigma + sigma_up z.
    x = np.asarray(noise, np.float64) * 1.5
    sg = np.full((b,), 1.5)
    d_c, d_u = (np.asarray(den(jnp.asarray(x, jnp.float32), sg, k), np.float64) for k in (c, u))
    x0 = d_u + lam * (d_c - d_u)
    up = min(0.7, eta * 0.7 * np.sqrt(1.5**2 - 0.7**2) / 1.5)
    down = np.sqrt(0.7**2 - up**2)
    z = np.asarray(
        jax.vmap(lambda k: jax.random.normal(k, (3,)))(step_keys(batch_keys(key, b), 0)[0])
    )
    np.testing.assert_allclose(x1, x0 + down * (x - d_u) / 1.5 + up * z, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(x1) - np.asarray(plain)).max() > 1e-2  # the renoise matters
    # eta = 0 is exactly CFG++ Euler.
    x_a0, _ = sample(den, noise, sig, solver=euler_ancestral(0.0), guidance=cfgpp(lam), **kw)
    x_e, _ = sample(den, noise, sig, solver=euler(), guidance=cfgpp(lam), **kw)
    np.testing.assert_array_equal(x_a0, x_e)


@pytest.mark.parametrize(
    "solver", [heun(), edm_stochastic(), dpmpp_2m()], ids=lambda s: type(s).__name__
)
def test_solvers_that_drop_the_renoise_estimate_refuse_cfgpp(solver):

    b = 4
    c, u = jnp.ones((b,), jnp.int32), jnp.zeros((b,), jnp.int32)
    kw = dict(solver=solver, cond=c, uncond=u, key=jax.random.key(0))
    name = type(solver).__name__
    for g in (cfgpp(0.6), within_interval(cfgpp(0.6), 0.5, 5.0)):
        with pytest.raises(InvalidArgumentError, match=f"{name}.*euler, ddim, euler_ancestral"):
            jax.jit(lambda n, g=g: sample(_guided_den(), n, karras_sigmas(3), guidance=g, **kw))(
                np.zeros((b, 2), np.float32)
            )  # fmt: skip


def test_guidance_runs_end_to_end_in_float64():
    # Float64 noise gives a float64 run: guidance states (APG momentum, AG's cosine) follow
    # the dtype given to init, so the scan carry keeps its types for every solver.
    x, c, u = points(8, seed=6)
    sigmas = karras_sigmas(6)
    gs = {"cfg": cfg(2.0), "apg": apg(2.0, r=1.0), "ag": ag(2.0), "interval": interval(2.0)}

    def go(noise):
        out = {}
        for solver in SOLVERS:
            for name, g in gs.items():
                kw = dict(cond=c, uncond=u, key=jax.random.key(1))
                out[solver, name] = sample(
                    MIX, noise, sigmas, solver=get_solver(solver), guidance=g, **kw
                )
        return out

    ref = jax.jit(go)(x)
    with jax.enable_x64(True):
        out = jax.jit(go)(np.asarray(x, np.float64))
    for k, (x64, aux) in out.items():
        assert x64.dtype == jnp.float64 and np.all(np.isfinite(x64)), k
        assert all(leaf.dtype != jnp.float32 for leaf in jax.tree.leaves(aux["guidance_state"])), k
        if get_solver(k[0]).stochastic:
            continue  # float64 normals are other draws than float32 ones from the same keys
        np.testing.assert_allclose(x64, ref[k][0], rtol=1e-4, atol=1e-4, err_msg=str(k))
        assert int(aux["nfe"]) == int(ref[k][1]["nfe"]), k
