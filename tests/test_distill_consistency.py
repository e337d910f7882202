"""Consistency distillation/training and multistep sampling against Gaussian closed forms.

For data ``x0 ~ N(MU, S^2 I)`` the exact denoiser and the PF-ODE flow are known
(tests/gaussian.py), so the exact consistency function is the ODE map to ``sigma_min``:
``f*(x, sigma) = MU + (x - MU) sqrt(S^2 + sigma_min^2) / sqrt(S^2 + sigma^2)``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.diffusion import EDM, VPEpsilon
from jaxdiff.distill.consistency import (
    CDConfig,
    CTConfig,
    consistency_state_shardings,
    init_cd_state,
    init_ct_state,
    make_cd_step,
    make_ct_step,
    sample_consistency,
)
from jaxdiff.distill.consistency_core import (
    ConsistencyFormulation,
    cd_loss,
    consistency_scalings,
    ct_loss,
    ct_target,
    distance,
    ect_r,
    ect_stage,
    multistep_sample,
    teacher_ode_step,
)
from jaxdiff.distill.few_step import few_step_sample
from jaxdiff.models import MLP
from jaxdiff.parallel import batch_sharding, make_mesh, replicated
from jaxdiff.samplers import Euler, Heun, Solver, edm_stochastic
from tests.gaussian import MU, S, denoiser, ode_solution

SIGMA_MIN = 0.002


def exact_f(sigma_min=SIGMA_MIN):
    """The exact consistency function of N(MU, S^2): the PF-ODE map to sigma_min."""

    def f(x, sigma, cond=None):
        sig = sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))
        return MU + (x - MU) * jnp.sqrt(S**2 + sigma_min**2) / jnp.sqrt(S**2 + sig**2)

    return f


@dataclasses.dataclass(frozen=True)
class ExactStep(Solver):
    """A 'solver' that transports x along the exact Gaussian PF-ODE (ignores the denoiser)."""

    def step(self, den, x, i, sigmas, state, ev, key):
        s, s_next = sigmas[i], sigmas[i + 1]
        return MU + (x - MU) * jnp.sqrt(S**2 + s_next**2) / jnp.sqrt(S**2 + s**2), state, ev


def gaussian_net(params, x_in, noise_label, cond):
    """The EDM network F whose denoiser is exact for N(mu, s2 I) (a teacher 'apply')."""
    del cond
    sigma = EDM().sigma_from_noise_label(noise_label)
    p = EDM().precondition(sigma)
    col = lambda v: v.reshape(-1, 1)  # noqa: E731
    x = x_in / col(p.c_in)
    d = params["mu"] + params["s2"] / (params["s2"] + col(sigma) ** 2) * (x - params["mu"])
    return (d - col(p.c_skip) * x) / col(p.c_out)


TEACHER = {"mu": jnp.float32(MU), "s2": jnp.float32(S**2)}
MODEL = MLP(features=32, depth=2)


def mlp_apply(params, x_in, noise_label, cond):
    return MODEL.apply({"params": params}, x_in, noise_label, cond)


def data_batch(n=64, key=3):
    return {"image": MU + S * jax.random.normal(jax.random.key(key), (n, 2))}


def test_boundary_holds_exactly_for_random_params_and_matches_song_and_edm():
    model = MLP(features=16, depth=1, zero_init_output=False)
    x = 2.0 * jax.random.normal(jax.random.key(0), (6, 2))
    sigma = jnp.asarray([0.01, 0.1, 0.5, 1.0, 10.0, 80.0])

    @jax.jit
    def evaluate(x, sigma):
        params = model.init(jax.random.key(1), x, jnp.zeros((6,)))["params"]
        net = lambda xi, c, cond: model.apply({"params": params}, xi, c, cond)  # noqa: E731
        at_min = jnp.full((6,), SIGMA_MIN)
        out = {
            "boundary_edm": ConsistencyFormulation(EDM(), SIGMA_MIN).as_denoiser(net)(x, at_min),
            "boundary_vp": ConsistencyFormulation(VPEpsilon(), SIGMA_MIN).as_denoiser(net)(
                x, at_min
            ),
        }
        # EDM base: Song et al.'s c_skip x + c_out F with F the raw network output.
        p = EDM().precondition(sigma)
        c_skip, c_out = (c[:, None] for c in consistency_scalings(sigma, SIGMA_MIN, 0.5))
        out["song"] = c_skip * x + c_out * net(p.c_in[:, None] * x, p.c_noise, None)
        out["edm"] = ConsistencyFormulation(EDM(), SIGMA_MIN).as_denoiser(net)(x, sigma)
        # VP base: the same, with the network's output mapped into EDM's F first.
        d_vp = VPEpsilon().as_denoiser(net)(x, sigma)
        f_edm_of_vp = (d_vp - p.c_skip[:, None] * x) / p.c_out[:, None]
        out["song_vp"] = c_skip * x + c_out * f_edm_of_vp
        out["vp"] = ConsistencyFormulation(VPEpsilon(), SIGMA_MIN).as_denoiser(net)(x, sigma)
        # sigma_min = 0 (ECT) is EDM's denoiser itself.
        out["ect"] = ConsistencyFormulation(EDM(), 0.0).as_denoiser(net)(x, sigma)
        out["d_edm"] = EDM().as_denoiser(net)(x, sigma)
        return out

    out = evaluate(x, sigma)
    np.testing.assert_array_equal(out["boundary_edm"], x)
    np.testing.assert_array_equal(out["boundary_vp"], x)
    np.testing.assert_allclose(out["edm"], out["song"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["vp"], out["song_vp"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["ect"], out["d_edm"])


def _cd_losses(solver, pairs, n=256):
    """CD losses of the exact consistency function, one per (sigma_hi, sigma_lo), one jit."""
    k1, k2 = jax.random.split(jax.random.key(5))
    x0 = MU + S * jax.random.normal(k1, (n, 2))
    eps = jax.random.normal(k2, (n, 2))
    f = exact_f()

    @jax.jit
    def losses(x0, eps):
        out = []
        for hi, lo in pairs:
            hi, lo = jnp.full((n,), hi), jnp.full((n,), lo)
            out.append(cd_loss(f, f, denoiser(), solver, x0, eps, hi, lo)[0])
        return jnp.stack(out)

    return np.asarray(losses(x0, eps))


def test_exact_consistency_function_zero_loss_and_solver_orders():
    assert float(_cd_losses(ExactStep(), [(1.0, 0.5)])[0]) < 1e-12
    # Local error of one step is O(h^2) for Euler and O(h^3) for Heun; the L2 loss squares it.
    pairs = [(1.0, 1.0 - h) for h in (0.2, 0.1, 0.05)]
    for solver, order in ((Euler(), 2), (Heun(), 3)):
        losses = _cd_losses(solver, pairs)
        np.testing.assert_allclose(np.log2(losses[:-1] / losses[1:]) / 2, order, atol=0.25)
    # Heun's step agrees with the closed-form ODE map to its order.
    x = jnp.asarray([[1.5, -0.7]])
    out = teacher_ode_step(denoiser(), Heun(), x, jnp.asarray([1.0]), jnp.asarray([0.9]))
    np.testing.assert_allclose(out, ode_solution(x, 1.0, 0.9), atol=2e-4)


def test_teacher_step_takes_one_level_pair_per_sample_and_refuses_stochastic_solvers():
    x = jnp.asarray([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]])
    hi, lo = jnp.asarray([2.0, 1.0, 0.5]), jnp.asarray([1.5, 0.4, 0.1])
    out = teacher_ode_step(denoiser(), Euler(), x, hi, lo)
    for b in range(3):
        one = teacher_ode_step(denoiser(), Euler(), x[b : b + 1], hi[b : b + 1], lo[b : b + 1])
        np.testing.assert_allclose(out[b], one[0], rtol=1e-6)
    np.testing.assert_allclose(out[1], x[1] + (0.4 - 1.0) * (x[1] - denoiser()(x[1:2], hi[1:2])[0]))
    with pytest.raises(ValueError, match="stochastic"):
        teacher_ode_step(denoiser(), edm_stochastic(s_churn=40.0), x, hi, lo)
    with pytest.raises(ValueError, match="stochastic"):
        CDConfig(solver=edm_stochastic(s_churn=40.0))
    with pytest.raises(ValueError, match="metric"):
        CDConfig(metric="lpips")
    with pytest.raises(ValueError, match="mapping"):
        CTConfig(mapping="linear")


def test_ct_target_tends_to_cd_target_as_dt_vanishes():
    n = 128
    k1, k2 = jax.random.split(jax.random.key(11))
    x0 = MU + S * jax.random.normal(k1, (n, 2))
    eps = jax.random.normal(k2, (n, 2))
    t = jnp.exp(jnp.linspace(-2.0, 2.0, n))
    f = exact_f()

    @jax.jit
    def gaps(x0, eps, t):
        out = []
        for stage in (4, 8, 12):  # dt shrinks 16x every 4 stages
            r = ect_r(t, stage, sigma_min=SIGMA_MIN)
            ct = ct_target(f, x0, eps, r, None, SIGMA_MIN)
            cd = f(teacher_ode_step(denoiser(), Heun(), x0 + t[:, None] * eps, t, r), r)
            out.append(jnp.max(jnp.abs(ct - cd)))
        return jnp.stack(out)

    g = np.asarray(gaps(x0, eps, t))
    # The targets' gap is O(dt): the same eps versus the teacher's ODE step.
    assert g[2] < 1e-2 and g[0] / g[1] > 8 and g[1] / g[2] > 8, g
    # At the boundary (r clipped to sigma_min) the target is x0 + sigma_min eps, f not called.
    boom = lambda x, s, c: jnp.where(s[:, None] > SIGMA_MIN, x, jnp.nan)  # noqa: E731
    at_min = ct_target(boom, x0, eps, jnp.full((n,), SIGMA_MIN), None, SIGMA_MIN)
    np.testing.assert_allclose(at_min, x0 + SIGMA_MIN * eps, rtol=1e-6)
    r = ect_r(t, 12, sigma_min=SIGMA_MIN)
    loss, metrics = jax.jit(lambda: ct_loss(f, x0, eps, t, r, None, sigma_min=SIGMA_MIN))()
    assert np.isfinite(float(loss)) and float(metrics["dt"]) > 0


def test_ect_schedule_against_hand_computed_values():
    # r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), clipped at sigma_min; sigmoid(-1) =
    # 0.26894142, so stage 3 at t = 1: 1 - (1 + 8 * 0.26894142) / 16 = 0.80302929.
    cases = [
        ((1.0, 0), {}, 0.0),
        ((10.0, 0), {}, 4.998184085),
        ((1.0, 3), {}, 0.803029289),
        ((0.5, 5), {}, 0.468591208),
        ((2.0, 1), {"mapping": "const"}, 1.5),
        ((3.0, 2), {"mapping": "const", "q": 4.0}, 2.953125),
        ((1.0, 0), {"sigma_min": 0.002}, 0.002),
    ]
    for (t, stage), kw, want in cases:
        np.testing.assert_allclose(float(ect_r(jnp.float32(t), stage, **kw)), want, rtol=1e-6)
    np.testing.assert_array_equal(ect_stage(jnp.asarray([0, 99, 100, 250]), 100), [0, 0, 1, 2])


def test_distances():
    a = jnp.zeros((2, 4, 4, 1))
    b = a.at[0].set(0.5)

    @jax.jit
    def evaluate(a, b):
        grad = jax.grad(lambda x: distance(x, b, "pseudo_huber", 0.0).sum())(b)
        return distance(a, b, "l2"), distance(a, b, "pseudo_huber"), grad

    l2, huber, grad = evaluate(a, b)
    np.testing.assert_allclose(l2, [0.25, 0.0])
    c = 0.00054 * 4.0  # iCT: 0.00054 sqrt(16)
    np.testing.assert_allclose(huber, [np.sqrt(4 + c**2) - c, 0.0], rtol=1e-6)
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) == 0.0


def test_multistep_sampling_matches_data_moments_and_few_step_loop():
    noise = jax.random.normal(jax.random.key(2), (4096, 2))
    levels = [80.0, 1.0, 0.3]
    key = jax.random.key(4)
    x = jax.jit(lambda z: multistep_sample(exact_f(), z, None, levels, SIGMA_MIN, key))(noise)
    np.testing.assert_allclose(np.mean(x), MU, atol=0.03)
    np.testing.assert_allclose(np.var(x), S**2 + SIGMA_MIN**2, rtol=0.05)
    # With sigma_min = 0 the loop is few_step_sample's (the renoise solver's), key for key.
    gen = lambda p, xx, s, c: exact_f(0.0)(xx, jnp.broadcast_to(s, xx.shape[:1]))  # noqa: E731
    ours = multistep_sample(exact_f(0.0), noise[:8], None, levels, 0.0, key)
    theirs = few_step_sample(gen, None, noise[:8], None, levels, key)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


init_mlp = jax.jit(lambda x: MODEL.init(jax.random.key(0), x, jnp.zeros(x.shape[:1]))["params"])


def test_cd_steps_on_a_tiny_mlp_reduce_the_loss_and_shard():
    cfg = CDConfig(num_levels=8, solver="heun", target_ema=0.9)
    tx = optax.adam(3e-3)
    batch = data_batch()
    params = init_mlp(batch["image"])
    init = init_cd_state(None, params, tx, cfg, ema_rates=(0.99,))
    step = jax.jit(make_cd_step(mlp_apply, gaussian_net, EDM(), cfg, tx))

    key = jax.random.key(1)

    def loss_at(state):  # the loss of state's params and target at a fixed key (step 0's)
        return float(step(state.replace(step=jnp.int32(0)), TEACHER, batch, key)[1]["loss"])

    first, metrics = step(init, TEACHER, batch, key)
    state = first
    for _ in range(40):
        state, metrics = step(state, TEACHER, batch, key)
    before, after = loss_at(init), loss_at(state)
    assert after < 0.5 * before, (before, after)
    assert int(state.step) == 41 and int(state.gen.step) == 41
    assert set(metrics) == {"loss", "distance", "grad_norm"}
    # One step sharded over the 8 test devices equals the single-device step.
    mesh = make_mesh()
    rep = replicated(mesh)
    p_shard = jax.tree.map(lambda _: rep, params)
    shards = consistency_state_shardings(jax.eval_shape(lambda: init), p_shard, tx, mesh)
    sharded = jax.jit(
        make_cd_step(mlp_apply, gaussian_net, EDM(), cfg, tx),
        in_shardings=(shards, rep, {"image": batch_sharding(mesh)}, rep),
        out_shardings=(shards, rep),
    )
    out, _ = sharded(init, TEACHER, batch, key)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(first), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The trained student samples through its consistency function.
    sample = jax.jit(lambda p, z: sample_consistency(mlp_apply, p, z, None, EDM(), cfg))
    x = sample(state.gen.params, batch["image"])
    assert x.shape == (64, 2) and np.all(np.isfinite(x))


def test_ct_steps_follow_the_stage_and_stay_finite():
    cfg = CTConfig(stage_length=1, huber_c=0.0)
    tx = optax.adam(1e-3)
    batch = data_batch()
    state = init_ct_state(None, init_mlp(batch["image"]), tx, cfg)
    step_fn = make_ct_step(mlp_apply, None, EDM(), cfg, tx)
    step = jax.jit(step_fn)
    stages = []
    for _ in range(3):
        state, metrics = step(state, None, batch, jax.random.key(2))
        stages.append(float(metrics["stage"]))
        assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert stages == [0.0, 1.0, 2.0] and int(state.gen.step) == 3
    # Sharded over the 8 test devices, across a stage change, equals one device.
    from tests.tiny import run_sharded_steps

    init = init_ct_state(None, init_mlp(batch["image"]), tx, cfg)
    images = [batch["image"]] * 2
    one = run_sharded_steps(make_mesh(devices=jax.devices()[:1]), step_fn, init, images)
    eight = run_sharded_steps(make_mesh(), step_fn, init, images)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
