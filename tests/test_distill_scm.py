"""sCM in TrigFlow: conversions, the teacher's velocity, tangents, boundary, training.

For data ``x0 ~ N(MU, S^2 I)`` the TrigFlow PF-ODE trajectories are
``x_t = MU cos t + c sqrt(S^2 cos^2 t + sd^2 sin^2 t)`` (``c`` constant), and the exact
consistency function maps ``x_t`` to its trajectory's ``t = 0`` point,
``f*(x_t, t) = MU + (x_t / cos t - MU) S / sqrt(S^2 + sigma^2)``, ``sigma = sd tan t``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from gaussian import MU, S
from gaussian import exact_edm_net as gaussian_exact_edm_net
from tiny import run_sharded_steps

from jaxdiff.diffusion import EDM
from jaxdiff.diffusion.formulation import expand_to
from jaxdiff.distill.scm import (
    SCMConfig,
    init_scm_state,
    make_scm_step,
    sample_scm,
    scm_sample_times,
    scm_tangent,
    student_fn,
)
from jaxdiff.distill.trigflow import (
    consistency_fn,
    edm_to_trig_x,
    sigma_from_trig,
    teacher_velocity,
    trig_from_sigma,
    trig_net,
    trig_noise,
    trig_to_edm_x,
)
from jaxdiff.models.layers import sinusoidal_features
from jaxdiff.models.unet import UNet
from jaxdiff.parallel import make_mesh

SD = 0.5
EDM_F = EDM(sigma_data=SD)
SHAPE = (8, 4, 4, 1)


def _traj_norm(t):
    return jnp.sqrt(S**2 * jnp.cos(t) ** 2 + SD**2 * jnp.sin(t) ** 2)


def velocity_exact(x_t, t):
    """Closed-form TrigFlow PF-ODE velocity of the Gaussian."""
    c = (x_t - MU * expand_to(jnp.cos(t), x_t)) / expand_to(_traj_norm(t), x_t)
    slope = (SD**2 - S**2) * jnp.sin(t) * jnp.cos(t) / _traj_norm(t)
    return -MU * expand_to(jnp.sin(t), x_t) + c * expand_to(slope, x_t)


def f_exact(x_t, t):
    sigma = SD * jnp.tan(t)
    return MU + (trig_to_edm_x(x_t, t) - MU) * expand_to(S / jnp.sqrt(S**2 + sigma**2), x_t)


def exact_trig_student(params, x_in, label, cond):
    """f* as a raw 'trigflow' network (label = t): F = (cos t x_t - f*) / (sd sin t)."""
    del params, cond
    x_t = SD * x_in
    f = f_exact(x_t, label)
    return (expand_to(jnp.cos(label), x_t) * x_t - f) / expand_to(SD * jnp.sin(label), x_t)


exact_edm_net = gaussian_exact_edm_net(EDM_F)


def _points(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x_t = jnp.asarray(rng.standard_normal((n, 3)), jnp.float32)
    t = jnp.asarray(rng.uniform(0.05, 1.5, n), jnp.float32)
    return x_t, t


def test_trigflow_edm_conversions_are_exact():
    x_t, t = _points()
    sigma = sigma_from_trig(t, SD)
    np.testing.assert_allclose(trig_from_sigma(sigma, SD), t, rtol=1e-6)
    np.testing.assert_allclose(float(trig_from_sigma(jnp.inf, SD)), np.pi / 2)
    np.testing.assert_allclose(edm_to_trig_x(trig_to_edm_x(x_t, t), sigma, SD), x_t, rtol=1e-5)
    # TrigFlow noising divided by cos t is EDM noising at sigma = sd tan t.
    x0, n = x_t, jnp.flip(x_t, 0)
    np.testing.assert_allclose(
        trig_to_edm_x(trig_noise(x0, SD * n, t), t), x0 + expand_to(sigma, n) * n, atol=2e-4
    )

    # An EDM network read as TrigFlow ("edm"): f is exactly EDM's denoiser at (x/cos t, sigma).
    def net(params, x_in, label, cond):
        return jnp.tanh(x_in * expand_to(label, x_in) + 0.3) * 2.0

    f = consistency_fn(
        x_t, t, trig_net(net, None, x_t, t, None, sigma_data=SD, parameterisation="edm"), SD
    )
    d = EDM_F.denoise(lambda *a: net(None, *a), trig_to_edm_x(x_t, t), sigma)
    np.testing.assert_allclose(f, d, atol=2e-5)


def test_teacher_velocity_is_the_exact_pf_ode():
    x_t, t = _points()
    denoise = EDM_F.as_denoiser(lambda *a: exact_edm_net(None, *a))
    np.testing.assert_allclose(
        teacher_velocity(denoise, x_t, t, None, SD), velocity_exact(x_t, t), atol=3e-5
    )


def test_exact_consistency_function_has_zero_tangent_loss_and_samples_the_data():
    x_t, t = _points()
    cfg = SCMConfig(parameterisation="trigflow", weighting="uniform", tangent_warmup_steps=0)
    f_net = student_fn(exact_trig_student, cfg)
    f = consistency_fn(x_t, t, f_net(None, x_t, t, None), SD)
    np.testing.assert_allclose(f, f_exact(x_t, t), atol=1e-5)
    _, g = scm_tangent(f_net, None, x_t, t, velocity_exact(x_t, t), None, SD)
    np.testing.assert_allclose(g, 0.0, atol=3e-5)  # f* is constant along the exact ODE
    # The full sCD step with the exact teacher: zero loss.
    tx = optax.sgd(0.0)
    step = make_scm_step(exact_trig_student, exact_edm_net, EDM_F, cfg, tx)
    state = init_scm_state(jax.random.key(0), {}, tx, cfg)
    x0 = MU + S * jax.random.normal(jax.random.key(1), (32, 3))
    _, metrics = jax.jit(step)(state, None, {"image": x0}, jax.random.key(2))
    assert float(metrics["mse"]) < 1e-8 and float(metrics["tangent_norm"]) < 1e-3
    # One step: f* of sd * noise at t_max, in closed form; two steps: the data's moments.
    noise = jax.random.normal(jax.random.key(3), (4000, 2))
    one = sample_scm(exact_trig_student, None, noise, None, jax.random.key(4), cfg=cfg)
    t_max = jnp.full((4000,), cfg.t_max)
    np.testing.assert_allclose(one, f_exact(SD * noise, t_max), atol=1e-5)
    two = sample_scm(exact_trig_student, None, noise, None, jax.random.key(4), cfg=cfg, num_steps=2)
    assert abs(float(jnp.mean(two)) - MU) < 0.03 and abs(float(jnp.std(two)) - S) < 0.03


def test_sample_times_and_config_checks():
    cfg = SCMConfig()
    assert scm_sample_times(1, cfg) == (cfg.t_max,)
    assert scm_sample_times(2, cfg) == (cfg.t_max, 1.1)
    np.testing.assert_allclose(scm_sample_times(3, cfg)[1:], (1.1, 0.55))
    np.testing.assert_allclose(cfg.t_max, np.arctan(80 / 0.5))
    with pytest.raises(ValueError, match="mode"):
        SCMConfig(mode="nope")
    with pytest.raises(ValueError, match="weighting"):
        SCMConfig(weighting="nope")
    with pytest.raises(ValueError, match="apply_teacher"):
        make_scm_step(exact_trig_student, None, None, SCMConfig(), optax.sgd(0.1))


UNET = UNet(
    ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, embedding_scale=10.0
)
"""Embedding scale 10: float32 finite differences resolve the time dependence."""


def apply_unet(params, x, label, cond, **kwargs):
    return UNET.apply({"params": params}, x, label, cond, **kwargs)


def test_unet_tangent_matches_finite_differences_and_the_boundary_holds():
    x, t0 = jnp.zeros(SHAPE), jnp.zeros(SHAPE[:1])
    shapes = nn.unbox(jax.eval_shape(lambda: UNET.init(jax.random.key(0), x, t0)["params"]))
    rng = np.random.default_rng(0)
    fill = lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32)  # noqa: E731
    params = jax.tree.map(fill, shapes)
    x_t = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    dxdt = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    t = jnp.asarray(rng.uniform(0.3, 1.2, SHAPE[0]), jnp.float32)
    f_net = student_fn(apply_unet, SCMConfig())
    h = 1e-3

    @jax.jit
    def run(params):
        f = lambda xx, tt: consistency_fn(xx, tt, f_net(params, xx, tt, None), SD)  # noqa: E731
        _, g = scm_tangent(f_net, params, x_t, t, dxdt, None, SD)
        hb = jnp.full_like(t, h)
        fd = (f(x_t + h * dxdt, t + hb) - f(x_t - h * dxdt, t - hb)) / (2 * h)
        _, g_cold = scm_tangent(f_net, params, x_t, t, dxdt, None, SD, warmup=0.0)
        f_minus = f_net(params, x_t, t, None)
        return g, expand_to(jnp.cos(t), x_t) * fd, g_cold, f_minus, f(x_t, jnp.zeros_like(t))

    g, g_fd, g_cold, f_minus, boundary = run(params)
    rel = jnp.linalg.norm(g - g_fd) / jnp.linalg.norm(g)
    assert float(rel) < 2e-3, float(rel)
    # Warm-up r = 0 keeps only -cos^2 t (sd F- - dx/dt).
    cos2 = expand_to(jnp.cos(t) ** 2, x_t)
    np.testing.assert_allclose(g_cold, -cos2 * (SD * f_minus - dxdt), rtol=1e-5, atol=1e-5)
    # The boundary f(x, 0) = x holds by construction, for any params.
    np.testing.assert_array_equal(boundary, x_t)


def test_unet_scd_steps_run_with_learned_weighting_and_warmup():
    cfg = SCMConfig(tangent_warmup_steps=4)
    tx = optax.adam(1e-3)
    x, t0 = jnp.zeros(SHAPE), jnp.zeros(SHAPE[:1])
    params = nn.unbox(jax.jit(UNET.init)(jax.random.key(0), x, t0)["params"])
    state = init_scm_state(jax.random.key(1), params, tx, cfg, ema_rates=(0.9,))
    step = jax.jit(make_scm_step(apply_unet, exact_edm_net, EDM_F, cfg, tx))
    data = MU + S * jax.random.normal(jax.random.key(5), SHAPE)
    for _ in range(2):
        state, metrics = step(state, None, {"image": data}, jax.random.key(6))
        assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["warmup"]) == 0.25 and int(state.step) == 2
    assert "0.9" in state.gen.ema and int(state.weight.step) == 2


class AffineInX(nn.Module):
    """F = a(label) * x_in + b(label): contains the Gaussian's exact consistency function."""

    @nn.compact
    def __call__(self, x_in, label, cond=None):
        feats = jnp.concatenate([label[:, None], sinusoidal_features(4 * label, 16)], axis=-1)
        h = nn.silu(nn.Dense(64)(nn.silu(nn.Dense(64)(feats))))
        a, b = jnp.split(nn.Dense(2 * x_in.shape[-1])(h), 2, axis=-1)
        return a * x_in + b


@pytest.mark.parametrize("mode,batch", [("distill", 64), ("train", 256)])
def test_training_approaches_the_exact_consistency_function(mode, batch):
    """A model class that contains f*: sCD (exact teacher) and sCT (data) drive it there."""
    net = AffineInX()
    apply = lambda p, *a, **k: net.apply({"params": p}, *a, **k)  # noqa: E731
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    rng = np.random.default_rng(5)
    tp = jnp.asarray(rng.uniform(0.1, 1.4, 256), jnp.float32)
    x0 = MU + S * rng.standard_normal((256, 2))
    xp = jnp.asarray(trig_noise(x0, SD * rng.standard_normal(x0.shape), tp), jnp.float32)
    cfg = SCMConfig(mode=mode, tangent_warmup_steps=20)
    f_net = student_fn(apply, cfg)
    err = jax.jit(
        lambda p: jnp.mean(
            (consistency_fn(xp, tp, f_net(p, xp, tp, None), SD) - f_exact(xp, tp)) ** 2
        )
    )
    tx = optax.adam(3e-3)
    state = init_scm_state(jax.random.key(1), params, tx, cfg, ema_rates=(0.9,))
    step = jax.jit(make_scm_step(apply, exact_edm_net, EDM_F, cfg, tx))
    before = float(err(state.gen.params))
    data = MU + S * jax.random.normal(jax.random.key(1), (100, batch, 2))
    for i in range(100):
        state, _ = step(state, None, {"image": data[i]}, jax.random.key(6))
    # The EMA copy: the raw params oscillate around f* (stop-gradient fixed-point updates).
    after = float(err(state.gen.ema["0.9"]))
    assert after < 0.1 * before, (before, after)


def test_sharded_step_equals_single_device_step():
    net = AffineInX()
    apply = lambda p, *a, **k: net.apply({"params": p}, *a, **k)  # noqa: E731
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    cfg = SCMConfig(tangent_warmup_steps=2)
    tx = optax.adam(1e-2)
    state = init_scm_state(jax.random.key(1), params, tx, cfg, ema_rates=(0.9,))
    step = make_scm_step(apply, exact_edm_net, EDM_F, cfg, tx)
    batches = MU + S * jax.random.normal(jax.random.key(1), (2, 16, 2))
    single = run_sharded_steps(make_mesh(devices=jax.devices()[:1]), step, state, batches)
    sharded = run_sharded_steps(make_mesh(), step, state, batches)
    assert jax.device_count() == 8
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(close, single, sharded)
