"""MeanFlow: the identity on Gaussian data, JVP vs finite differences, sampling, training.

For data ``x ~ N(MU, S^2 I)`` the rectified flow ``z_t = (1 - t) x + t eps`` has the exact
trajectories ``z_s = (1 - s) MU + k g(s)`` with ``g(s) = sqrt(S^2 (1 - s)^2 + s^2)`` (``k``
constant along a trajectory), so the marginal velocity and the average velocity
``u(z, r, t) = (z_t - z_r) / (t - r)`` are known in closed form.
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
from jaxdiff.distill.meanflow import (
    MeanFlowConfig,
    average_velocity,
    flow_velocity,
    init_meanflow_state,
    make_meanflow_step,
    meanflow_target,
    sample_meanflow,
    sample_r_t,
)
from jaxdiff.models.layers import sinusoidal_features
from jaxdiff.models.unet import UNet
from jaxdiff.parallel import make_mesh

EDM_F = EDM(sigma_data=0.5)
SHAPE = (8, 4, 4, 1)


def _g(s):
    return jnp.sqrt(S**2 * (1 - s) ** 2 + s**2)


def _k(z, t):
    return (z - expand_to(1 - t, z) * MU) / expand_to(_g(t), z)


def v_exact(z, t):
    """Marginal velocity d z_t / dt of the Gaussian's rectified flow."""
    return -MU + _k(z, t) * expand_to((t - S**2 * (1 - t)) / _g(t), z)


def u_exact(z, r, t):
    """Average velocity (z_t - z_r) / (t - r) along the exact trajectory (v at r = t)."""
    z_r = expand_to(1 - r, z) * MU + _k(z, t) * expand_to(_g(r), z)
    gap = t - r
    safe = jnp.where(gap > 1e-6, gap, 1.0)
    return jnp.where(expand_to(gap > 1e-6, z), (z - z_r) / expand_to(safe, z), v_exact(z, t))


def exact_student(params, z, label, cond, aux_time):
    """The exact u as a 'network' on labels (t, t - r) (label_scale 1)."""
    del params, cond
    return u_exact(z, label - aux_time, label)


exact_edm_net = gaussian_exact_edm_net(EDM_F)


def _points(n=64, seed=0):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.standard_normal((n, 3)), jnp.float32)
    t = jnp.asarray(rng.uniform(0.05, 0.95, n), jnp.float32)
    r = jnp.asarray(rng.uniform(0.0, 1.0, n), jnp.float32) * t
    return z, r, t


def test_teacher_flow_velocity_is_the_exact_marginal_velocity():
    z, _, t = _points()
    denoise = EDM_F.as_denoiser(lambda *a: exact_edm_net(None, *a))
    np.testing.assert_allclose(flow_velocity(denoise, z, t, None), v_exact(z, t), atol=2e-5)


def test_meanflow_identity_target_equals_the_exact_average_velocity():
    z, r, t = _points()
    u_fn = lambda zz, rr, tt: exact_student(None, zz, tt, None, tt - rr)  # noqa: E731
    u, u_tgt = meanflow_target(u_fn, z, r, t, v_exact(z, t))
    np.testing.assert_allclose(u, u_exact(z, r, t), atol=1e-6)
    # u_tgt = v - (t - r) du/dt with the JVP's total derivative is exactly u again.
    np.testing.assert_allclose(u_tgt, u, atol=2e-5)
    # And u is the real average: z_r = z_t - (t - r) u lands on the trajectory.
    z_r = z - expand_to(t - r, z) * u
    np.testing.assert_allclose(_k(z_r, r), _k(z, t), atol=2e-5)
    # r = t: the target is the instantaneous velocity itself.
    _, tgt_eq = meanflow_target(u_fn, z, t, t, v_exact(z, t))
    np.testing.assert_allclose(tgt_eq, v_exact(z, t), atol=1e-6)


def test_step_loss_is_zero_for_the_exact_u_and_teacher():
    cfg = MeanFlowConfig(velocity="teacher", ratio_r_neq_t=0.5)
    tx = optax.sgd(0.0)
    step = make_meanflow_step(exact_student, exact_edm_net, EDM_F, cfg, tx)
    x = MU + S * jax.random.normal(jax.random.key(1), (32, 3))
    state = init_meanflow_state(jax.random.key(0), {}, tx, cfg)
    state, metrics = jax.jit(step)(state, None, {"image": x}, jax.random.key(2))
    assert float(metrics["mse"]) < 1e-8
    assert 0.2 < float(metrics["r_neq_t"]) < 0.8
    assert int(state.step) == 1


def test_exact_u_samples_the_data_in_one_and_two_steps():
    eps = jax.random.normal(jax.random.key(3), (16, 3))
    cfg = MeanFlowConfig()
    for steps in (1, 2):
        x = sample_meanflow(exact_student, None, eps, None, cfg=cfg, num_steps=steps)
        # The exact flow maps eps to MU + S eps.
        np.testing.assert_allclose(x, MU + S * eps, atol=3e-6)


def test_time_sampler_and_config_checks():
    r, t = sample_r_t(jax.random.key(0), 4000, MeanFlowConfig())
    assert bool(jnp.all(r <= t)) and bool(jnp.all((t > 0) & (t < 1)))
    assert abs(float(jnp.mean(r < t)) - 0.25) < 0.03
    r, t = sample_r_t(jax.random.key(0), 100, MeanFlowConfig(ratio_r_neq_t=0.0))
    np.testing.assert_array_equal(r, t)
    with pytest.raises(ValueError, match="velocity"):
        MeanFlowConfig(velocity="nope")
    with pytest.raises(ValueError, match="ratio_r_neq_t"):
        MeanFlowConfig(ratio_r_neq_t=1.5)
    with pytest.raises(ValueError, match="apply_teacher"):
        make_meanflow_step(exact_student, None, None, MeanFlowConfig(velocity="teacher"), None)


UNET = UNet(
    ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, aux_time_embed=True
)


def apply_unet(params, x, label, cond, **kwargs):
    return UNET.apply({"params": params}, x, label, cond, **kwargs)


def _random_unet_params(seed):
    """Noise-filled params (no zero-initialised layers), made on the host: no compile."""
    x, t = jnp.zeros(SHAPE), jnp.zeros(SHAPE[:1])
    shapes = nn.unbox(jax.eval_shape(lambda: UNET.init(jax.random.key(0), x, t)["params"]))
    rng = np.random.default_rng(seed)
    fill = lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32)  # noqa: E731
    return jax.tree.map(fill, shapes)


def test_jvp_target_matches_finite_differences_on_a_unet():
    params = _random_unet_params(0)
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    v = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    t = jnp.asarray(rng.uniform(0.3, 0.9, SHAPE[0]), jnp.float32)
    r = t * jnp.asarray(rng.uniform(0.0, 1.0, SHAPE[0]), jnp.float32)
    # Labels 0.01 t keep the embedding's phases (x1000 inside the UNet) smooth enough for
    # float32 central differences with step h.
    h = 1e-3

    @jax.jit
    def both(params):
        def u_fn(zz, rr, tt):
            return average_velocity(apply_unet, params, zz, rr, tt, None, 0.01)

        u, u_tgt = meanflow_target(u_fn, z, r, t, v)
        # Central differences of u along (v, 0, 1), the total derivative in t.
        hb = jnp.full_like(t, h)
        fd = (u_fn(z + h * v, r, t + hb) - u_fn(z - h * v, r, t - hb)) / (2 * h)
        return u, u_tgt, v - expand_to(t - r, z) * fd

    u, u_tgt, tgt_fd = both(params)
    assert float(jnp.linalg.norm(u_tgt - v)) > 1.0  # the derivative term is not negligible
    rel = jnp.linalg.norm(u_tgt - tgt_fd) / jnp.linalg.norm(u_tgt - v)
    assert float(rel) < 2e-3, float(rel)


def test_unet_steps_and_sampling_run():
    cfg = MeanFlowConfig(ratio_r_neq_t=0.5)
    tx = optax.adam(1e-3)
    x, t = jnp.zeros(SHAPE), jnp.zeros(SHAPE[:1])
    params = nn.unbox(jax.jit(UNET.init)(jax.random.key(0), x, t)["params"])
    state = init_meanflow_state(jax.random.key(0), params, tx, cfg, ema_rates=(0.9,))
    step = jax.jit(make_meanflow_step(apply_unet, None, None, cfg, tx))
    data = MU + S * jax.random.normal(jax.random.key(5), SHAPE)
    for _ in range(2):
        state, metrics = step(state, None, {"image": data}, jax.random.key(6))
        assert all(np.isfinite(float(v)) for v in metrics.values())
    assert int(state.gen.step) == 2 and "0.9" in state.gen.ema
    sample = jax.jit(lambda p, n: sample_meanflow(apply_unet, p, n, None, cfg=cfg, num_steps=2))
    out = sample(state.gen.params, data)
    assert out.shape == SHAPE and bool(jnp.all(jnp.isfinite(out)))


class AffineInZ(nn.Module):
    """u = a(r, t) * z + b(r, t): can represent the Gaussian's exact average velocity."""

    @nn.compact
    def __call__(self, z, label, cond=None, aux_time=None):
        feats = [label[:, None], aux_time[:, None]]
        feats += [sinusoidal_features(10 * label, 16), sinusoidal_features(10 * aux_time, 16)]
        h = nn.silu(nn.Dense(64)(jnp.concatenate(feats, axis=-1)))
        a, b = jnp.split(nn.Dense(2 * z.shape[-1])(nn.silu(nn.Dense(64)(h))), 2, axis=-1)
        return a * z + b


@pytest.mark.parametrize(
    "velocity,batch,steps,factor", [("teacher", 64, 100, 0.2), ("data", 256, 100, 0.5)]
)
def test_training_approaches_the_exact_average_velocity(velocity, batch, steps, factor):
    """A model class that contains u_exact: the MeanFlow loss drives it there (from data
    alone, or faster from the exact teacher's velocity)."""
    net = AffineInZ()
    apply = lambda p, *a, **k: net.apply({"params": p}, *a, **k)  # noqa: E731
    zeros = jnp.zeros((1,))
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), zeros, None, aux_time=zeros)["params"]
    rng = np.random.default_rng(5)
    tp = jnp.asarray(rng.uniform(0.05, 0.95, 256), jnp.float32)
    rp = tp * jnp.asarray(rng.uniform(0.0, 1.0, 256), jnp.float32)
    x0 = MU + S * rng.standard_normal((256, 2))
    zp = expand_to(1 - tp, x0) * x0 + expand_to(tp, x0) * rng.standard_normal(x0.shape)
    zp = jnp.asarray(zp, jnp.float32)
    target = u_exact(zp, rp, tp)
    err = jax.jit(
        lambda p: jnp.mean((average_velocity(apply, p, zp, rp, tp, None, 1.0) - target) ** 2)
    )

    cfg = MeanFlowConfig(ratio_r_neq_t=0.5, velocity=velocity)
    tx = optax.adam(1e-2)
    state = init_meanflow_state(jax.random.key(0), params, tx, cfg)
    step = jax.jit(make_meanflow_step(apply, exact_edm_net, EDM_F, cfg, tx))
    before = float(err(state.gen.params))
    data = MU + S * jax.random.normal(jax.random.key(1), (steps, batch, 2))
    for i in range(steps):
        state, _ = step(state, None, {"image": data[i]}, jax.random.key(6))
    after = float(err(state.gen.params))
    assert after < factor * before, (before, after)


def test_sharded_step_equals_single_device_step():
    net = AffineInZ()
    apply = lambda p, *a, **k: net.apply({"params": p}, *a, **k)  # noqa: E731
    zeros = jnp.zeros((1,))
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), zeros, None, aux_time=zeros)["params"]
    cfg = MeanFlowConfig(ratio_r_neq_t=0.5, velocity="teacher")
    tx = optax.adam(1e-2)
    state = init_meanflow_state(jax.random.key(0), params, tx, cfg, ema_rates=(0.9,))
    step = make_meanflow_step(apply, exact_edm_net, EDM_F, cfg, tx)
    batches = MU + S * jax.random.normal(jax.random.key(1), (2, 16, 2))
    single = run_sharded_steps(make_mesh(devices=jax.devices()[:1]), step, state, batches)
    sharded = run_sharded_steps(make_mesh(), step, state, batches)
    assert jax.device_count() == 8
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(close, single, sharded)
