"""Samplers against closed-form Gaussian answers and float64 numpy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import MU, S, denoiser, denoiser_np, ode_solution

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.samplers import (
    SOLVERS,
    batch_keys,
    ddim,
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
from jaxdiff.utils.rng import per_sample_keys, start_noise

DEN = denoiser()


def _run(solver, noise, sigmas, key=None, **kw):
    fn = jax.jit(lambda n, s, k: sample(DEN, n, s, solver=solver, key=k, **kw))
    return fn(noise, sigmas, jax.random.key(0) if key is None else key)


def _convergence_slope(solver, steps=(8, 16, 32, 64)):
    """Slope of log(max error) against log(steps) on the exact ODE from 10 to 0.05."""
    x_t = np.linspace(-3.0, 3.0, 16, dtype=np.float32).reshape(8, 2)
    errs = []
    for n in steps:
        sig = karras_sigmas(n, sigma_min=0.05, sigma_max=10.0, append_zero=False)
        x, _ = _run(solver, x_t, sig)
        exact = ode_solution(x_t * sig[0].astype(np.float64), 10.0, 0.05)
        errs.append(np.max(np.abs(np.asarray(x, np.float64) - exact)))
    return np.polyfit(np.log(steps), np.log(errs), 1)[0], errs


@pytest.mark.parametrize(
    "solver,order", [(euler(), 1.0), (heun(), 2.0), (dpmpp_2m(), 2.0), (ddim(0.0), 1.0)]
)
def test_convergence_order(solver, order):
    slope, errs = _convergence_slope(solver)
    assert abs(-slope - order) < 0.25, (slope, errs)


def _affine_moments(solver, sigmas):
    """Final (mean, variance) of the sampler's output distribution, exactly.

    The Gaussian sampler is an affine map per dimension, x_T -> a x_T + b, so running it
    on x_T = 0 and x_T = 1 gives the mean (b) and variance (a^2) with no Monte-Carlo error.
    """
    x, aux = _run(solver, np.array([[0.0], [1.0]], np.float32), sigmas)
    b, a = float(x[0, 0]), float(x[1, 0] - x[0, 0])
    return b, a**2, aux


def _ode_truth(sigma_max):
    # The sampler starts from N(0, sigma_max^2), not the true marginal N(mu, s^2 + sigma_max^2):
    # the exact ODE maps that start to mean mu (1 - s / r) and variance s^2 sigma_max^2 / r^2,
    # r = sqrt(s^2 + sigma_max^2). Comparing against it isolates the solver's own error.
    r = np.sqrt(S**2 + sigma_max**2)
    return MU * (1 - S / r), S**2 * sigma_max**2 / r**2


def test_heun_256_steps_exact_moments():
    mean, var, aux = _affine_moments(heun(), karras_sigmas(256))
    true_mean, true_var = _ode_truth(80.0)
    assert abs(mean - true_mean) < 1e-3 and abs(var - true_var) < 1e-3
    assert abs(var - S**2) < 1e-3  # the prior mismatch itself is negligible at sigma_max=80
    assert int(aux["nfe"]) == 2 * 256 - 1


def test_heun_18_steps_variance_error_is_discretisation():
    # With 18 steps Heun's variance is off by about 10% on this data: a genuine
    # discretisation error (it shrinks with more steps), not a bug.
    errs = []
    for n in (18, 64, 256):
        _, var, _ = _affine_moments(heun(), karras_sigmas(n))
        errs.append(abs(var - _ode_truth(80.0)[1]) / S**2)
    assert 0.05 < errs[0] < 0.15 and errs[0] > errs[1] > errs[2], errs


@pytest.mark.parametrize(
    "solver,steps",
    [
        (edm_stochastic(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.0), 128),
        (euler_ancestral(), 512),
        (ddim(eta=1.0), 512),
    ],
)
def test_stochastic_solvers_reach_target_moments(solver, steps):
    n = 16384
    noise = per_sample_normal(jax.random.key(3), (n, 2))
    x, _ = _run(solver, noise, karras_sigmas(steps), key=jax.random.key(4))
    x = np.asarray(x, np.float64).ravel()
    m = x.size
    # 5 standard errors of the sample mean and variance of 2n Gaussian values.
    assert abs(x.mean() - MU) < 5 * S / np.sqrt(m)
    assert abs(x.var() - S**2) < 5 * S**2 * np.sqrt(2.0 / m) + 2e-3


def _edm_reference(x, sigmas, noises=None, churn=0.0, tmin=0.0, tmax=np.inf, snoise=1.0):
    """EDM Algorithms 1/2 in float64 numpy (a fresh implementation, for comparison)."""
    x = np.asarray(x, np.float64) * sigmas[0]
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(churn / n, np.sqrt(2) - 1) if tmin <= s <= tmax else 0.0
        s_hat = s * (1 + gamma)
        if noises is not None:
            x = x + np.sqrt(s_hat**2 - s**2) * snoise * noises[i]
        d = (x - denoiser_np(x, s_hat)) / s_hat
        x_next = x + (s_next - s_hat) * d
        if i < n - 1:
            d2 = (x_next - denoiser_np(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def test_heun_matches_float64_reference():
    sig = karras_sigmas(18)
    noise = np.asarray(per_sample_normal(jax.random.key(0), (16, 3)))
    x, aux = _run(heun(), noise, sig)
    ref = _edm_reference(noise, sig.astype(np.float64))
    np.testing.assert_allclose(np.asarray(x), ref, rtol=1e-5, atol=1e-5)
    assert int(aux["nfe"]) == 35


def test_edm_stochastic_matches_float64_reference():
    sig = karras_sigmas(18)
    b = 16
    noise = np.asarray(per_sample_normal(jax.random.key(0), (b, 3)))
    key = jax.random.key(7)
    keys = batch_keys(key, b)
    # The same per-step noise the sampler draws: step_keys' solver keys, then normal_like.
    step_noise = [
        np.asarray(jax.vmap(lambda k: jax.random.normal(k, (3,)))(step_keys(keys, i)[0]))
        for i in range(18)
    ]
    solver = edm_stochastic(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    x, _ = _run(solver, noise, sig, key=key)
    ref = _edm_reference(noise, sig.astype(np.float64), step_noise, 40.0, 0.05, 50.0, 1.003)
    np.testing.assert_allclose(np.asarray(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "solver,n,expected",
    [(euler(), 10, 10), (heun(), 10, 19), (dpmpp_2m(), 10, 10), (edm_stochastic(), 10, 19)],
)
def test_nfe_counts(solver, n, expected):
    _, aux = _run(solver, np.zeros((2, 2), np.float32), karras_sigmas(n))
    assert int(aux["nfe"]) == expected


def test_heun_without_final_zero_corrects_every_step():
    _, aux = _run(heun(), np.zeros((2, 2), np.float32), karras_sigmas(10, append_zero=False))
    assert int(aux["nfe"]) == 2 * 9


def test_ddim_equals_euler_and_euler_ancestral():
    sig = karras_sigmas(12)
    noise = per_sample_normal(jax.random.key(1), (8, 4))
    x_e, _ = _run(euler(), noise, sig)
    x_d, _ = _run(ddim(0.0), noise, sig)
    np.testing.assert_allclose(x_d, x_e, rtol=1e-4, atol=1e-4)
    k = jax.random.key(5)
    x_d1, _ = _run(ddim(1.0), noise, sig, key=k)
    x_a1, _ = _run(euler_ancestral(1.0), noise, sig, key=k)
    np.testing.assert_allclose(x_d1, x_a1, rtol=1e-4, atol=1e-4)


def test_sampler_traces_once():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(noise, sigmas, key):
        return sample(DEN, noise, sigmas, solver=edm_stochastic(), key=key)

    noise = np.zeros((4, 2), np.float32)
    run(noise, karras_sigmas(6), jax.random.key(0))
    run(noise + 1.0, karras_sigmas(6, sigma_max=20.0), jax.random.key(1))
    run(noise - 1.0, karras_sigmas(6, rho=3.0), jax.random.key(2))
    chex.clear_trace_counter()


def test_works_under_vmap_and_is_batch_size_invariant():
    sig = karras_sigmas(8)
    key = jax.random.key(11)
    big = per_sample_normal(key, (8, 2))
    small = per_sample_normal(key, (3, 2))
    np.testing.assert_array_equal(big[:3], small)
    solver = euler_ancestral()
    x_big, _ = _run(solver, big, sig, key=key)
    x_small, _ = _run(solver, small, sig, key=key)
    np.testing.assert_allclose(x_big[:3], x_small, rtol=1e-6, atol=1e-6)

    stacked = jnp.stack([big, big + 1.0])
    fn = jax.vmap(lambda n: sample(DEN, n, sig, solver=heun())[0])
    out = fn(stacked)
    np.testing.assert_allclose(out[0], _run(heun(), big, sig)[0], rtol=1e-6, atol=1e-6)


def test_clear_errors():
    with pytest.raises(ValueError, match="stochastic"):
        sample(DEN, np.zeros((2, 2)), karras_sigmas(3), solver=edm_stochastic())
    with pytest.raises(ValueError, match="at least 2 noise levels"):
        sample(DEN, np.zeros((2, 2)), np.array([1.0]), solver=euler())
    with pytest.raises(ValueError, match="per-sample keys"):
        sample(
            DEN,
            np.zeros((2, 2)),
            karras_sigmas(3),
            solver=euler(),
            key=jax.random.split(jax.random.key(0), 3),
        )
    with pytest.raises(ValueError, match="unknown solver"):
        get_solver("rk45")
    with pytest.raises(ValueError, match="s_churn"):
        edm_stochastic(s_churn=-1.0)


def test_every_registered_solver_runs_jitted():
    for name in SOLVERS:
        x, aux = _run(get_solver(name), np.ones((2, 3), np.float32), karras_sigmas(4))
        assert x.shape == (2, 3) and np.all(np.isfinite(x)), name
        assert int(aux["nfe"]) > 0


def test_batch_keys_and_start_noise_are_the_rng_helpers():
    key = jax.random.key(9)
    np.testing.assert_array_equal(
        jax.random.key_data(batch_keys(key, 5)), jax.random.key_data(per_sample_keys(key, 5))
    )
    raw = jax.random.key_data(key)  # a raw uint32[2] key gives the same keys
    np.testing.assert_array_equal(
        jax.random.key_data(batch_keys(raw, 5)), jax.random.key_data(batch_keys(key, 5))
    )
    mine = per_sample_keys(key, 4, start=20)  # [B] keys pass through unchanged
    np.testing.assert_array_equal(
        jax.random.key_data(batch_keys(mine, 4)), jax.random.key_data(mine)
    )
    np.testing.assert_array_equal(
        per_sample_normal(key, (5, 3, 2)), start_noise(per_sample_keys(key, 5), (3, 2))
    )
    np.testing.assert_array_equal(per_sample_normal(mine, (4, 3)), start_noise(mine, (3,)))


def test_solver_arguments_out_of_range_are_invalid_argument_errors():
    bad = [
        (lambda: ddim(eta=-0.5), "eta.*-0.5"),
        (lambda: ddim(eta=float("nan")), "eta.*nan"),
        (lambda: euler_ancestral(eta=-1.0), "eta.*-1"),
        (lambda: euler_ancestral(s_noise=-1.0), "s_noise.*-1"),
        (lambda: edm_stochastic(s_churn=-1.0), "s_churn.*-1"),
        (lambda: edm_stochastic(s_churn=float("inf")), "s_churn.*inf"),
        (lambda: edm_stochastic(s_noise=float("nan")), "s_noise.*nan"),
        (lambda: edm_stochastic(s_tmin=-0.1), "s_tmin.*-0.1"),
        (lambda: edm_stochastic(s_tmin=5.0, s_tmax=1.0), "s_tmax.*s_tmin.*got 1.0"),
        (lambda: get_solver("ddim", etaa=1.0), "etaa.*takes eta"),
        (lambda: get_solver("rk45"), "rk45.*euler"),
    ]
    for make, match in bad:
        with pytest.raises(InvalidArgumentError, match=match):
            make()
    assert get_solver("ddim", 0.5).eta == 0.5  # positional values from "ddim:0.5" work
    assert edm_stochastic(s_tmax=float("inf")).s_tmax == float("inf")


def test_zero_noise_hyperparameters_need_no_key_and_are_exactly_the_ode_solvers():
    sig = karras_sigmas(7)
    noise = per_sample_normal(jax.random.key(2), (6, 3))

    @jax.jit
    def go(noise):
        run = lambda solver: sample(DEN, noise, sig, solver=solver)  # noqa: E731  key=None
        return {
            "heun": run(heun()),
            "churn0": run(edm_stochastic(s_churn=0.0)),
            "euler": run(euler()),
            "ddim0": run(ddim(0.0)),
            "ancestral0": run(euler_ancestral(eta=0.0)),
            "ancestral_s0": run(euler_ancestral(eta=1.0, s_noise=0.0)),
        }

    for solver in (edm_stochastic(s_churn=0.0), ddim(0.0), euler_ancestral(0.0)):
        assert not solver.stochastic
    assert edm_stochastic(s_churn=0.0, s_tmin=0.05).stochastic is False
    assert edm_stochastic().stochastic and ddim(1.0).stochastic and euler_ancestral().stochastic
    out = go(noise)
    np.testing.assert_array_equal(out["churn0"][0], out["heun"][0])
    assert int(out["churn0"][1]["nfe"]) == int(out["heun"][1]["nfe"]) == 13
    np.testing.assert_array_equal(out["ddim0"][0], out["euler"][0])
    np.testing.assert_array_equal(out["ancestral0"][0], out["euler"][0])
    # s_noise = 0 keeps eta's deterministic sigma_down step: not Euler, but no noise either.
    assert np.all(np.isfinite(out["ancestral_s0"][0]))


def _step_noise(key, b, shape, i=0):
    """The fresh noise a solver draws at step ``i``: its step keys, then ``normal_like``."""
    keys = step_keys(batch_keys(key, b), i)[0]
    return np.asarray(jax.vmap(lambda k: jax.random.normal(k, shape))(keys))


def _ddim_vp_reference(x, x0, z, sigma, sigma_next, eta):
    """DDIM(eta) in its VP-coordinate form (Song et al. 2021), in float64 numpy."""
    x, x0, z = (np.asarray(a, np.float64) for a in (x, x0, z))
    abar, abar_next = 1.0 / (1.0 + sigma**2), 1.0 / (1.0 + sigma_next**2)
    eps = (np.sqrt(abar) * x - np.sqrt(abar) * x0) / np.sqrt(1.0 - abar)  # VP eps
    c = eta * np.sqrt((1.0 - abar_next) / (1.0 - abar) * (1.0 - abar / abar_next))
    x_vp = np.sqrt(abar_next) * x0 + np.sqrt(1.0 - abar_next - c**2) * eps + c * z
    return x_vp / np.sqrt(abar_next)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_the_vp_formula_in_float32_at_small_sigma(eta):
    # One step 0.01 -> 0.002: the VP form's 1 - alpha_bar cancels in float32 (about 3e-5
    # error); the sigma-space step keeps float32 precision.
    b, sigma, sigma_next = 64, 0.01, 0.002
    sig = np.array([sigma, sigma_next], np.float32)
    noise = per_sample_normal(jax.random.key(5), (b, 4))
    key = jax.random.key(6)
    out, _ = _run(ddim(eta), noise, sig, key=key)
    x = np.asarray(noise, np.float32) * np.float32(sigma)  # the sampler's float32 start
    z = _step_noise(key, b, (4,))
    x64 = x.astype(np.float64)
    ref = _ddim_vp_reference(x64, denoiser_np(x64, sigma), z, sigma, sigma_next, eta)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=0, atol=1e-6)


def test_float64_noise_gives_a_float64_run_for_every_solver():
    sig = karras_sigmas(18)
    noise32 = np.asarray(per_sample_normal(jax.random.key(0), (16, 3)))
    ref = _edm_reference(noise32, sig.astype(np.float64))  # Heun's 18 steps, float64
    x32, _ = _run(heun(), noise32, sig)
    with jax.enable_x64(True):
        for name in SOLVERS:
            x, aux = _run(get_solver(name), noise32.astype(np.float64), sig)
            assert x.dtype == jnp.float64 and np.all(np.isfinite(x)), name
        x64, aux = _run(heun(), noise32.astype(np.float64), sig)
        assert int(aux["nfe"]) == 35
        # A float64 denoiser on float32 noise: outputs are cast to the run's float32.
        den64 = lambda x, s, c=None: DEN(x.astype(jnp.float64), s.astype(jnp.float64))  # noqa: E731
        x_mixed, _ = sample(den64, noise32, sig, solver=heun())
        assert x_mixed.dtype == jnp.float32
    # The closed form of these 18 Heun steps (the float64 reference) is matched to float64
    # rounding, where float32 is about 1e-6 off. (Against the exact ODE solution both carry
    # the same, much larger, discretisation error of 18 steps.)
    err64 = np.abs(np.asarray(x64) - ref).max()
    err32 = np.abs(np.asarray(x32, np.float64) - ref).max()
    assert err64 < 1e-12 < 1e-8 < err32 < 1e-5, (err64, err32)
    np.testing.assert_allclose(x_mixed, x32, rtol=1e-5, atol=1e-5)
