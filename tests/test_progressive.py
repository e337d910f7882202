"""Progressive distillation against closed forms on Gaussian data (tests/gaussian.py).

For ``x0 ~ N(MU, S^2 I)`` the exact denoiser is ``D(x, s) = MU + S^2 / (S^2 + s^2) (x - MU)``
and the PF-ODE flow is known, so the two-Euler-step target, the loss and its gradient have
float64 numpy references.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from gaussian import MU, S, denoiser, denoiser_np, exact_edm_net, ode_solution
from tiny import run_sharded_steps

from jaxdiff.diffusion import EDM
from jaxdiff.distill.progressive import (
    ProgressiveConfig,
    draw_levels,
    init_progressive_state,
    make_progressive_step,
    progressive_levels,
    progressive_loss,
    progressive_round,
    progressive_sigmas,
    progressive_state_shardings,
    progressive_target,
    round_steps,
    sample_progressive,
    student_steps,
)
from jaxdiff.models import MLP
from jaxdiff.parallel import make_mesh, replicated
from jaxdiff.samplers import get_solver, sample

SD = 0.5
EDM_F = EDM(sigma_data=SD)


def gauss_apply(params, x_in, label, cond):
    """An EDM network whose denoiser is exact for N(params["mu"], params["s2"] I)."""
    del cond
    sigma = EDM_F.sigma_from_noise_label(label)
    p = EDM_F.precondition(sigma)
    col = lambda v: v.reshape(-1, 1)  # noqa: E731
    x = x_in / col(p.c_in)
    d = params["mu"] + params["s2"] / (params["s2"] + col(sigma) ** 2) * (x - params["mu"])
    return (d - col(p.c_skip) * x) / col(p.c_out)


def gauss_params(mu=MU, s2=S**2):
    return {"mu": jnp.float32(mu), "s2": jnp.float32(s2)}


def np_target(x, s, s_mid, s_next, mu=MU, s2=S**2):
    """float64 two Euler steps of the exact teacher, then x~ = (x'' - r x) / (1 - r)."""
    d = lambda y, sig: mu + s2 / (s2 + sig**2) * (y - mu)  # noqa: E731
    x1 = d(x, s) + (s_mid / s) * (x - d(x, s))
    x2 = d(x1, s_mid) + (s_next / s_mid) * (x1 - d(x1, s_mid))
    r = s_next / s
    return (x2 - r * x) / (1.0 - r)


def test_nested_grid_endpoints_traced_levels_schedule_and_config():
    grids = {n: progressive_sigmas(n) for n in (1, 2, 4, 8, 16)}
    for n in (2, 4, 8, 16):
        np.testing.assert_array_equal(grids[n][::2], grids[n // 2])
        assert grids[n].shape == (n + 1,) and grids[n].dtype == np.float32
        assert np.all(np.diff(grids[n]) < 0)
    np.testing.assert_array_equal(grids[1], [80.0, 0.0])
    hi, lo = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    np.testing.assert_allclose(
        grids[4][1:4], [(hi + u * (lo - hi)) ** 7 for u in (0.25, 0.5, 0.75)]
    )
    assert grids[16][-2] > 0.002  # u = 1 (sigma_min) is never a level: the last step goes to 0
    # The jnp levels with a traced number of steps (one compile for every N).
    levels = jax.jit(lambda n: progressive_levels(jnp.arange(17), n))
    for n in (16, 8, 2):
        np.testing.assert_allclose(levels(n)[: n + 1], grids[n], rtol=3e-6)
    # Round r: a start_steps / 2^r step teacher and a half-as-many step student.
    cfg = ProgressiveConfig(start_steps=16, rounds=3, steps_per_round=2)
    rounds = progressive_round(jnp.asarray([0, 1, 2, 3, 4, 5, 6, 100]), cfg)
    np.testing.assert_array_equal(rounds, [0, 0, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(round_steps(jnp.arange(3), cfg), [16, 8, 4])
    np.testing.assert_array_equal(student_steps(jnp.arange(3), cfg), [8, 4, 2])
    assert cfg.final_steps == 2
    np.testing.assert_array_equal(cfg.sigmas(), grids[2])
    for bad, match in (
        (dict(start_steps=12, rounds=3), "multiple of 2\\^rounds"),
        (dict(rounds=0), "rounds"),
        (dict(steps_per_round=0), "steps_per_round"),
        (dict(sigma_min=0.0), "sigma_min"),
    ):
        with pytest.raises(ValueError, match=match):
            ProgressiveConfig(**bad)
    with pytest.raises(ValueError, match="ema_rates"):
        init_progressive_state(
            None, gauss_params(), optax.sgd(1.0), ProgressiveConfig(teacher_from_ema=True)
        )


def test_step_loss_and_gradient_match_a_float64_reference():
    cfg = ProgressiveConfig(start_steps=8, rounds=2, steps_per_round=5)
    tx = optax.sgd(1.0)
    teacher, student = gauss_params(), gauss_params(0.2, 0.5)
    state = init_progressive_state(None, teacher, tx, cfg)
    state = state.replace(gen=state.gen.replace(params=student))
    x0 = MU + S * jax.random.normal(jax.random.key(0), (32, 3))
    key = jax.random.key(7)
    step = jax.jit(make_progressive_step(gauss_apply, None, EDM_F, cfg, tx))
    new, metrics = step(state, None, {"image": x0}, key)
    s, s_mid, s_next, eps = (
        np.asarray(a, np.float64) for a in draw_levels(jax.random.fold_in(key, 0), x0.shape, 0, cfg)
    )
    # Round 0: the teacher takes 8 steps, i in [0, 4) picks levels 2i, 2i + 1, 2i + 2.
    grid = progressive_sigmas(8).astype(np.float64)
    i = np.argmin(np.abs(grid[None, :-2] - s[:, None]), axis=1)
    np.testing.assert_allclose(grid[i], s, rtol=1e-6)
    np.testing.assert_allclose(grid[i + 1], s_mid, rtol=1e-6)
    np.testing.assert_allclose(grid[i + 2], s_next, rtol=1e-6, atol=1e-12)
    assert set(np.unique(i)) == {0, 2, 4, 6}

    col = lambda v: v[:, None]  # noqa: E731
    x = np.asarray(x0, np.float64) + col(s) * eps
    target = np_target(x, col(s), col(s_mid), col(s_next))
    c_out = col(s * SD / np.sqrt(s**2 + SD**2))

    def loss(mu, s2):
        return np.mean(((denoiser_np(x, col(s), mu, np.sqrt(s2)) - target) / c_out) ** 2)

    np.testing.assert_allclose(float(metrics["loss"]), loss(0.2, 0.5), rtol=1e-4)
    h = 1e-6
    grad = [(loss(0.2 + h, 0.5) - loss(0.2 - h, 0.5)) / (2 * h)]
    grad.append((loss(0.2, 0.5 + h) - loss(0.2, 0.5 - h)) / (2 * h))
    np.testing.assert_allclose(float(metrics["grad_norm"]), np.hypot(*grad), rtol=1e-3)
    np.testing.assert_allclose(new.gen.params["mu"], 0.2 - grad[0], rtol=1e-3)
    assert float(metrics["round"]) == 0.0 and float(metrics["student_steps"]) == 4.0
    jax.tree.map(np.testing.assert_array_equal, new.teacher, teacher)


def test_target_is_the_exact_one_step_denoiser_when_euler_is_exact_and_converges_otherwise():
    hs = (0.2, 0.1, 0.05)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2)) * 1.5, jnp.float32)
    ones = jnp.ones((16,), jnp.float32)

    @jax.jit
    def targets(x):
        out = [
            progressive_target(denoiser(), x, ones, ones * (1 - h / 2), ones * (1 - h)) for h in hs
        ]
        # Point-mass data (S = 0): D = MU is the PF-ODE's exact Euler denoiser, so the
        # target is MU for any levels, and the exact student has zero loss.
        point = denoiser(s=0.0)
        grid = progressive_sigmas(8)
        s, s_mid, s_next = (jnp.asarray(grid[j::2][:4]) for j in range(3))
        xs = x[:4]
        out.append(progressive_target(point, xs, s, s_mid, s_next))
        out.append(progressive_loss(point, point, EDM_F, xs, x[4:8], s, s_mid, s_next)[None])
        return out

    *pair, point_target, point_loss = targets(x)
    np.testing.assert_allclose(point_target, MU, atol=2e-6)
    assert float(point_loss[0]) < 1e-10
    # Two Euler half steps have local error O(h^2) against the exact ODE; the float64
    # reference agrees with the jax target.
    errs = []
    for h, t in zip(hs, pair, strict=True):
        np.testing.assert_allclose(
            t, np_target(np.asarray(x, np.float64), 1.0, 1 - h / 2, 1 - h), rtol=2e-5, atol=1e-6
        )
        x2 = (1 - (1 - h)) * np.asarray(t, np.float64) + (1 - h) * np.asarray(x, np.float64)
        errs.append(np.max(np.abs(x2 - ode_solution(x, 1.0, 1 - h))))
    np.testing.assert_allclose(np.log2(np.asarray(errs[:-1]) / errs[1:]), 2.0, atol=0.15)


def test_edm_network_output_is_minus_v_and_the_loss_is_the_snr_plus_one_v_loss():
    rng = np.random.default_rng(1)
    grid = progressive_sigmas(4).astype(np.float64)  # a teacher of 4 steps, student of 2
    idx = np.asarray([0, 1, 0, 1, 1, 0])
    s, s_mid, s_next = grid[2 * idx], grid[2 * idx + 1], grid[2 * idx + 2]
    s = s * np.asarray([1, 1, 0.01, 0.1, 1, 1])  # also small levels (s' < s, s'' < s hold)
    s_mid, s_next = np.minimum(s_mid, 0.6 * s), np.minimum(s_next, 0.3 * s)
    s_next[[1, 4]] = 0.0
    x0 = MU + S * rng.standard_normal((6, 3))
    eps = rng.standard_normal((6, 3))
    col = lambda v: v[:, None]  # noqa: E731
    x = x0 + col(s) * eps
    # Salimans & Ho's variance-preserving view: z = alpha x / sd, data scaled by 1 / sd.
    norm = lambda v: np.sqrt(v**2 + SD**2)  # noqa: E731
    alpha, sig = (col(v) for v in (SD / norm(s), s / norm(s)))
    z = alpha * x / SD
    d_hat = denoiser_np(x, col(s))
    v_hat = (alpha * z - d_hat / SD) / sig
    p = EDM_F.precondition(jnp.asarray(s, jnp.float32))
    f = exact_edm_net(EDM_F)(None, p.c_in[:, None] * jnp.asarray(x, jnp.float32), p.c_noise, None)
    np.testing.assert_allclose(f, -v_hat, rtol=1e-4, atol=1e-4)

    # Their Algorithm 2 in VP space: two DDIM steps, then
    # x~ = (z'' - (s''/s) z) / (a'' - (s''/s) a).
    def ddim(zz, a, sg, a_next, sg_next, a_sig):
        x_hat = denoiser_np(zz / a * SD, a_sig) / SD
        return a_next * x_hat + sg_next * (zz - a * x_hat) / sg

    a1, g1 = (col(v) for v in (SD / norm(s_mid), s_mid / norm(s_mid)))
    a2, g2 = (col(v) for v in (SD / norm(s_next), s_next / norm(s_next)))
    z1 = ddim(z, alpha, sig, a1, g1, col(s))
    z2 = ddim(z1, a1, g1, a2, g2, col(s_mid))
    x_tilde_vp = (z2 - (g2 / sig) * z) / (a2 - (g2 / sig) * alpha)
    np.testing.assert_allclose(
        x_tilde_vp * SD, np_target(x, col(s), col(s_mid), col(s_next)), rtol=1e-9
    )
    v_target = (alpha * z - x_tilde_vp) / sig
    v_loss = np.mean((v_hat - v_target) ** 2)
    snr_loss = np.mean((1 + alpha**2 / sig**2) * ((d_hat - x_tilde_vp * SD) / SD) ** 2)
    np.testing.assert_allclose(v_loss, snr_loss, rtol=1e-10)
    student = EDM_F.as_denoiser(lambda *a: exact_edm_net(EDM_F)(None, *a))
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    ours = progressive_loss(
        student, denoiser(), EDM_F, f32(x0), f32(eps), f32(s), f32(s_mid), f32(s_next)
    )
    np.testing.assert_allclose(float(ours), v_loss, rtol=2e-4)


def _run(step, state, batch, n):
    states, metrics = [state], []
    for _ in range(n):
        state, m = step(state, None, batch, jax.random.key(3))
        states.append(state)
        metrics.append(m)
    return states, jax.tree.map(lambda *v: np.asarray(v), *metrics)


def test_rounds_replace_the_teacher_and_restart_the_optimizer_and_ema():
    tx = optax.adam(1e-2)
    params = gauss_params(0.1, 0.3)
    batch = {"image": MU + S * jax.random.normal(jax.random.key(0), (16, 2))}
    cfg = ProgressiveConfig(start_steps=8, rounds=2, steps_per_round=2)
    step = jax.jit(make_progressive_step(gauss_apply, None, EDM_F, cfg, tx))
    states, metrics = _run(step, init_progressive_state(None, params, tx, cfg, (0.9,)), batch, 6)
    np.testing.assert_array_equal(metrics["round"], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(metrics["student_steps"], [4, 4, 2, 2, 2, 2])
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)  # noqa: E731
    for k in (1, 2):
        same(states[k].teacher, params)
    for k in (3, 4, 5, 6):  # switched once, at the start of step 2; step 4 is past the rounds
        same(states[k].teacher, states[2].gen.params)
    assert not np.allclose(states[2].gen.params["mu"], params["mu"])
    counts = [int(s.gen.opt_state[0].count) for s in states]
    assert counts == [0, 1, 2, 1, 2, 3, 4], counts
    # The switch is exactly: teacher <- params, a fresh optimizer, the EMA <- params.
    p2 = states[2].gen.params
    by_hand = states[2].replace(
        teacher=p2, gen=states[2].gen.replace(opt_state=tx.init(p2), ema={"0.9": p2})
    )
    same(step(by_hand, None, batch, jax.random.key(3))[0], states[3])
    assert int(states[3].gen.step) == 3 and int(states[3].step) == 3

    # Keeping the optimizer and EMA, with the EMA as the next teacher.
    cfg = ProgressiveConfig(
        start_steps=8,
        rounds=2,
        steps_per_round=2,
        teacher_from_ema=True,
        reset_optimizer=False,
        reset_ema=False,
    )
    step = jax.jit(make_progressive_step(gauss_apply, None, EDM_F, cfg, tx))
    states, _ = _run(step, init_progressive_state(None, params, tx, cfg, (0.9,)), batch, 3)
    same(states[3].teacher, states[2].gen.ema["0.9"])
    assert int(states[3].gen.opt_state[0].count) == 3


def test_sharded_steps_equal_one_device_steps():
    cfg = ProgressiveConfig(start_steps=4, rounds=2, steps_per_round=1)  # a switch at step 1
    tx = optax.adam(1e-2)
    state = init_progressive_state(None, gauss_params(0.1, 0.3), tx, cfg, ema_rates=(0.9,))
    step = make_progressive_step(gauss_apply, None, EDM_F, cfg, tx)
    batches = MU + S * jax.random.normal(jax.random.key(1), (3, 16, 2))
    single = run_sharded_steps(make_mesh(devices=jax.devices()[:1]), step, state, batches)
    sharded = run_sharded_steps(make_mesh(), step, state, batches)
    assert jax.device_count() == 8 and float(single[1]["round"]) == 1.0
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(close, single, sharded)
    # The driver's shardings: one per leaf, the teacher's following the params'.
    mesh = make_mesh()
    p_shard = jax.tree.map(lambda _: replicated(mesh), state.teacher)
    shards = progressive_state_shardings(jax.eval_shape(lambda: state), p_shard, tx, mesh)
    assert jax.tree.structure(shards) == jax.tree.structure(state)
    assert shards.teacher is p_shard


def test_student_sampling_equals_the_standard_euler_sampler_on_the_same_levels():
    net = MLP(features=16, depth=1, num_classes=3, zero_init_output=False)
    apply = lambda p, *a: net.apply({"params": p}, *a)  # noqa: E731
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    cfg = ProgressiveConfig(start_steps=8, rounds=2)
    noise = jax.random.normal(jax.random.key(1), (8, 2))
    cond = jnp.arange(8, dtype=jnp.int32) % 3

    @jax.jit
    def both(params, noise, cond):
        out = {}
        for n in (1, 2, 4):
            ours = sample_progressive(apply, params, noise, cond, EDM_F, cfg, num_steps=n)
            den = EDM_F.as_denoiser(lambda x, c, cd: apply(params, x, c, cd))
            theirs = sample(den, noise, cfg.sigmas(n), solver=get_solver("euler"), cond=cond)[0]
            out[n] = (ours, theirs)
        return out

    for n, (ours, theirs) in both(params, noise, cond).items():
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5, err_msg=f"{n} steps")
        assert np.all(np.isfinite(ours)) and float(jnp.std(ours)) > 0
