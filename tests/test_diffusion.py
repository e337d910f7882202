"""Formulations, conversions and schedules against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import MU, S, denoiser_np

from jaxdiff.diffusion import (
    EDM,
    CosineVPSchedule,
    FlowMatching,
    LinearVPSchedule,
    VPEpsilon,
    VPrediction,
    expand_to,
    flow_sigmas,
    flow_t_to_sigma,
    get_formulation,
    karras_sigmas,
    log_linear_sigmas,
    logsnr_to_sigma,
    sigma_to_flow_t,
    sigma_to_logsnr,
    sigma_to_vp,
    vp_sigmas,
    vp_to_sigma,
)
from jaxdiff.diffusion.vp_schedules import DiscreteVPSchedule, get_vp_schedule
from jaxdiff.samplers import euler, sample

FORMULATIONS = [
    EDM(),
    EDM(sigma_data=1.0),
    VPEpsilon(schedule=LinearVPSchedule()),
    VPEpsilon(schedule=CosineVPSchedule()),
    VPEpsilon(schedule=DiscreteVPSchedule(), noise_label_scale=1000.0),
    VPrediction(schedule=CosineVPSchedule()),
    FlowMatching(),
    FlowMatching(shift=3.0),
    FlowMatching(time_reversed=True, noise_label_scale=1.0),
]
IDS = [
    "edm",
    "edm_sd1",
    "vp_linear",
    "vp_cosine",
    "vp_discrete",
    "v_cosine",
    "flow",
    "flow_shift3",
    "flow_reversed",
]


def oracle_net(form):
    """A network that outputs the exact target of Gaussian data, knowing only its inputs.

    It recovers sigma from the noise label and x from c_in x, so it also checks that every
    formulation's noise label and input scaling are invertible.
    """

    def net(x_in, c_noise, cond=None):
        sigma = form.sigma_from_noise_label(c_noise)
        c = form.precondition(sigma)
        x = x_in / expand_to(c.c_in, x_in)
        d = MU + S**2 / (S**2 + expand_to(sigma, x) ** 2) * (x - MU)
        return (d - expand_to(c.c_skip, x) * x) / expand_to(c.c_out, x)

    return net


@pytest.mark.parametrize("form", FORMULATIONS, ids=IDS)
def test_exact_network_gives_exact_denoiser(form):
    sigma = jnp.array([0.02, 0.3, 1.0, 5.0, 40.0])
    x = jax.random.normal(jax.random.key(0), (5, 3)) * (1 + sigma[:, None])
    d = form.denoise(oracle_net(form), x, sigma)
    ref = denoiser_np(np.asarray(x, np.float64), np.asarray(sigma, np.float64)[:, None])
    np.testing.assert_allclose(np.asarray(d), ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("form", FORMULATIONS, ids=IDS)
def test_loss_at_optimum_is_irreducible(form):
    # At the optimum D = E[x0 | x], so the x0-space error is the posterior variance
    # s^2 sigma^2 / (s^2 + sigma^2) per dimension, weighted by lambda(sigma) = 1 / c_out^2.
    n, dim = 20000, 4
    for sig in (0.1, 0.7, 3.0):
        sigma = jnp.full((n,), sig)
        k1, k2 = jax.random.split(jax.random.key(1))
        x0 = MU + S * jax.random.normal(k1, (n, dim))
        noise = jax.random.normal(k2, (n, dim))
        loss = form.loss_at(oracle_net(form), x0, sigma, noise)
        expected = float(form.loss_weight(sig)) * S**2 * sig**2 / (S**2 + sig**2)
        # Each per-example loss is lambda * posterior variance * chi2(dim)/dim.
        tol = 5 * expected * np.sqrt(2.0 / dim / n)
        assert abs(float(loss.mean()) - expected) < tol, (sig, float(loss.mean()), expected)


@pytest.mark.parametrize("form", FORMULATIONS, ids=IDS)
def test_closed_form_target_matches_generic(form):
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    x0 = jax.random.normal(k1, (6, 2, 2, 1))
    noise = jax.random.normal(k2, (6, 2, 2, 1))
    sigma = jnp.exp(jax.random.normal(k3, (6,)))
    x = x0 + expand_to(sigma, x0) * noise
    c = form.precondition(sigma)
    ref = (x0 - expand_to(c.c_skip, x0) * x) / expand_to(c.c_out, x0)
    np.testing.assert_allclose(form.target(x0, noise, sigma), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", FORMULATIONS, ids=IDS)
def test_perfect_prediction_has_zero_loss(form):
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    x0 = jax.random.normal(k1, (4, 3))
    noise = jax.random.normal(k2, (4, 3))
    sigma = form.sample_sigma(k3, (4,))

    def cheat(x_in, c_noise, cond=None):
        return form.target(x0, noise, sigma)

    np.testing.assert_allclose(form.loss_at(cheat, x0, sigma, noise), 0.0, atol=1e-10)
    assert form.loss(cheat, x0, k3).shape == (4,)


def test_training_noise_distributions():
    key = jax.random.key(4)
    log_sigma = jnp.log(EDM().sample_sigma(key, (50000,)))
    assert abs(float(log_sigma.mean()) + 1.2) < 0.03 and abs(float(log_sigma.std()) - 1.2) < 0.03
    t = sigma_to_flow_t(FlowMatching().sample_sigma(key, (50000,)))
    assert abs(float(jnp.median(t)) - 0.5) < 0.01
    t_shift = sigma_to_flow_t(FlowMatching(shift=3.0).sample_sigma(key, (50000,)))
    assert abs(float(jnp.median(t_shift)) - 0.75) < 0.01  # shift(0.5) = 3 * 0.5 / 2
    vp = VPEpsilon()
    sig = vp.sample_sigma(key, (10000,))
    lo, hi = vp.schedule.sigma(vp.t_min), vp.schedule.sigma(vp.t_max)
    assert float(sig.min()) >= float(lo) * 0.999 and float(sig.max()) <= float(hi) * 1.001


def test_vpred_is_edm_with_unit_sigma_data_up_to_sign():
    sigma = jnp.array([0.1, 1.0, 10.0])
    v, e = VPrediction().precondition(sigma), EDM(sigma_data=1.0).precondition(sigma)
    np.testing.assert_allclose(v.c_skip, e.c_skip, rtol=1e-6)
    np.testing.assert_allclose(v.c_in, e.c_in, rtol=1e-6)
    np.testing.assert_allclose(v.c_out, -e.c_out, rtol=1e-6)


def test_conversions_round_trip():
    sigma = jnp.array([0.002, 0.5, 1.0, 80.0])
    np.testing.assert_allclose(logsnr_to_sigma(sigma_to_logsnr(sigma)), sigma, rtol=1e-5)
    alpha, sigma_vp = sigma_to_vp(sigma)
    np.testing.assert_allclose(alpha**2 + sigma_vp**2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(vp_to_sigma(alpha, sigma_vp), sigma, rtol=1e-5)
    np.testing.assert_allclose(flow_t_to_sigma(sigma_to_flow_t(sigma)), sigma, rtol=1e-4)
    for sched in (LinearVPSchedule(), CosineVPSchedule()):
        t = jnp.array([1e-4, 0.01, 0.3, 0.7, 0.95])
        np.testing.assert_allclose(sched.t_from_sigma(sched.sigma(t)), t, rtol=2e-5)
        np.testing.assert_allclose(sched.alpha(t) ** 2, 1 / (1 + sched.sigma(t) ** 2), rtol=1e-5)
    # The cosine schedule's definition in float64: alpha = cos(a) / cos(a0).
    t64, s = np.array([1e-4, 0.01, 0.3, 0.7, 0.95]), CosineVPSchedule().s
    angle = (t64 + s) / (1 + s) * np.pi / 2
    want = 2 * (np.log(np.cos(angle)) - np.log(np.cos(s / (1 + s) * np.pi / 2)))
    got = CosineVPSchedule().log_alpha2(jnp.asarray(t64, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_sigma_schedules():
    k = karras_sigmas(18)
    assert k.shape == (19,) and k.dtype == np.float32
    np.testing.assert_allclose([k[0], k[-2], k[-1]], [80.0, 0.002, 0.0], rtol=1e-5)
    assert np.all(np.diff(k) < 0)
    ll = log_linear_sigmas(5, 0.1, 10.0, append_zero=False)
    np.testing.assert_allclose(np.diff(np.log(ll)), np.log(0.01) / 4, rtol=1e-5)
    vp = vp_sigmas(10, LinearVPSchedule())
    assert vp.shape == (11,) and np.all(np.diff(vp) < 0) and vp[-1] == 0
    fl = flow_sigmas(4)
    np.testing.assert_allclose(fl / (1 + fl), [0.999, 0.74925, 0.4995, 0.24975, 0.0], rtol=1e-4)
    shifted = flow_sigmas(4, shift=3.0)
    assert np.all(shifted[1:-1] > fl[1:-1])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(0)
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(4, sigma_min=10.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="infinite"):
        vp_sigmas(4, CosineVPSchedule(), t_max=1.0)
    with pytest.raises(ValueError, match="t_max"):
        flow_sigmas(4, t_max=1.0)
    with pytest.raises(ValueError, match="unknown formulation"):
        get_formulation("ddpm++")
    with pytest.raises(ValueError, match="t_min"):
        VPEpsilon(t_min=0.5, t_max=0.1)
    assert isinstance(get_formulation("v", schedule="cosine").schedule, CosineVPSchedule)


def ddpm_sigmas_np():
    """DiT's ``get_named_beta_schedule("linear", 1000)`` restated in float64 numpy."""
    betas = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)
    return np.sqrt(1.0 / np.cumprod(1.0 - betas) - 1.0)


def test_discrete_schedule_is_the_ddpm_table():
    sched, ref = DiscreteVPSchedule(), ddpm_sigmas_np()
    np.testing.assert_allclose(sched.sigmas(), ref, rtol=1e-12)
    index = np.arange(1000)
    sig = np.asarray(sched.sigma(jnp.asarray(index / 1000.0, jnp.float32)))
    np.testing.assert_allclose(sig, ref, rtol=2e-6)
    # Between steps log(sigma) is linear in the index: a half step is the geometric mean.
    half = np.asarray(sched.sigma(jnp.asarray((index[:-1] + 0.5) / 1000.0, jnp.float32)))
    np.testing.assert_allclose(half, np.sqrt(ref[:-1] * ref[1:]), rtol=2e-6)
    # The inverse gives back the step index, at and between the steps.
    np.testing.assert_allclose(sched.t_from_sigma(ref) * 1000, index, atol=2e-3)
    t = jnp.linspace(0.0, 0.999, 4001)
    np.testing.assert_allclose(sched.t_from_sigma(sched.sigma(t)), t, atol=2e-6)
    np.testing.assert_allclose(sched.alpha(t) ** 2, 1 / (1 + sched.sigma(t) ** 2), rtol=1e-5)
    # Outside the table, time is clamped to the first/last step.
    np.testing.assert_allclose(sched.sigma(jnp.array([-0.5, 1.0])), ref[[0, -1]], rtol=2e-6)
    np.testing.assert_allclose(sched.t_from_sigma(jnp.array([1e-4, 1e4])), [0.0, 0.999])
    assert isinstance(get_vp_schedule("discrete_linear"), DiscreteVPSchedule)
    form = get_formulation("eps", schedule="discrete_linear", noise_label_scale=1000.0)
    assert isinstance(form.schedule, DiscreteVPSchedule)
    with pytest.raises(ValueError, match="discrete_linear"):
        get_vp_schedule("quadratic")
    with pytest.raises(ValueError, match="beta_start"):
        DiscreteVPSchedule(beta_start=0.1, beta_end=0.01)


def test_discrete_vp_epsilon_is_ddpm_pred_xstart():
    # DiT's _predict_xstart_from_eps: x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps(x_t, i),
    # with the network fed x_t and the step index i itself.
    form = VPEpsilon(schedule=DiscreteVPSchedule(), noise_label_scale=1000.0)
    steps = np.array([0, 3, 250, 617, 999])
    abar = 1.0 / (1.0 + ddpm_sigmas_np()[steps] ** 2)
    x_t = np.random.default_rng(0).standard_normal((5, 3))
    seen = {}

    def eps_net(x_in, c_noise, cond=None):
        seen["x"], seen["label"] = x_in, c_noise
        return jnp.sin(x_in) * (1.0 + c_noise[:, None] / 1000.0)

    sigma = form.schedule.sigma(jnp.asarray(steps / 1000.0, jnp.float32))
    x = jnp.asarray(x_t / np.sqrt(abar)[:, None], jnp.float32)
    d = form.denoise(eps_net, x, sigma)
    eps = np.sin(x_t) * (1.0 + steps[:, None] / 1000.0)
    ref = np.sqrt(1.0 / abar)[:, None] * x_t - np.sqrt(1.0 / abar - 1.0)[:, None] * eps
    np.testing.assert_allclose(seen["label"], steps, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(seen["x"], x_t, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(d) - ref).max() / np.abs(ref).max() < 1e-5


def sit_velocity(x_s, s):
    """A fake SiT network: any smooth function of (x_s, s)."""
    return np.cos(x_s) * s[:, None] - 0.3 * x_s


def test_reversed_flow_denoiser_is_sits_x0_estimate():
    # SiT, Linear path: x_s = s x0 + (1 - s) n (data at s = 1), v = x0 - n. Its ODE's
    # estimate of the data is x_s + (1 - s) v; its Tweedie estimate, restated from
    # ICPlan.get_score_from_velocity, x_s / s + (1 - s)^2 / s * score with
    # score = (s v - x_s) / (1 - s). Both must equal jaxdiff's denoiser.
    form = FlowMatching(time_reversed=True, noise_label_scale=1.0)
    s = np.array([0.05, 0.13, 0.5, 0.8, 0.97])
    x_s = np.random.default_rng(1).standard_normal((5, 3))

    def net(x_in, c_noise, cond=None):
        return jnp.cos(x_in) * c_noise[:, None] - 0.3 * x_in

    sigma = jnp.asarray((1.0 - s) / s, jnp.float32)
    d = np.asarray(form.denoise(net, jnp.asarray(x_s / s[:, None], jnp.float32), sigma))
    v = sit_velocity(x_s, s)
    np.testing.assert_allclose(d, x_s + (1.0 - s[:, None]) * v, rtol=1e-5, atol=1e-5)
    score = (s[:, None] * v - x_s) / (1.0 - s[:, None])
    tweedie = x_s / s[:, None] + (1.0 - s[:, None]) ** 2 / s[:, None] * score
    np.testing.assert_allclose(d, tweedie, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(form.precondition(sigma).c_noise, s, rtol=1e-6)
    np.testing.assert_allclose(form.sigma_from_noise_label(s), sigma, rtol=1e-5)


def test_euler_on_reversed_flow_is_sits_euler_ode():
    # SiT's fixed-step Euler ODE x <- x + (s' - s) v(x, s) from s = 0.2 to 1, against
    # jaxdiff's Euler in sigma space on the same grid (sigma = (1 - s) / s, x = x_s / s).
    form = FlowMatching(time_reversed=True, noise_label_scale=1.0)
    grid = np.array([0.2, 0.35, 0.6, 0.85, 1.0])
    x_s = np.random.default_rng(2).standard_normal((3, 4)) * (1 - grid[0])
    ref = x_s.copy()
    for s, s_next in zip(grid[:-1], grid[1:], strict=True):
        ref = ref + (s_next - s) * sit_velocity(ref, np.full(3, s))

    def net(x_in, c_noise, cond=None):
        return jnp.cos(x_in) * c_noise[:, None] - 0.3 * x_in

    sigmas = (1.0 - grid) / grid
    noise = jnp.asarray(x_s / grid[0] / sigmas[0], jnp.float32)  # start x = noise * sigma_0
    out, _ = sample(form.as_denoiser(net), noise, jnp.asarray(sigmas), solver=euler())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
