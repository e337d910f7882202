"""f-distill steps: reverse-KL == DMD2, sharded == single device, pools, few-step, features."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.distill import pool as pool_lib
from jaxdiff.distill.fdistill import (
    FDistillConfig,
    Nets,
    distill_state_shardings,
    generator_loss,
    init_distill_state,
    is_generator_step,
    jit_steps,
    make_steps,
)
from jaxdiff.distill.features import input_features
from jaxdiff.distill.few_step import (
    active_steps,
    backward_simulate,
    few_step_sample,
    student_sigmas,
)
from jaxdiff.distill.heads import DiscHead
from jaxdiff.distill.losses import dmd2_loss, vsd_loss
from jaxdiff.distill.ratio import f_weights
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.parallel import make_mesh, replicated

NUM_CLASSES = 3


def gaussian_denoise(p, x, sigma, cond):
    """Exact denoiser of N(mu, s2 I) (a 'network' whose params are mu and s2)."""
    del cond
    s2 = sigma.reshape(-1, 1) ** 2
    return p["mu"] + p["s2"] / (p["s2"] + s2) * (x - p["mu"]), []


TEACHER = {"mu": jnp.asarray([1.0, -1.0]), "s2": jnp.asarray(0.25)}
STUDENT = {"mu": jnp.asarray([0.5, -0.2]), "s2": jnp.asarray(0.6)}


def toy_nets(cfg, head_width=16):
    head = DiscHead(width=head_width, num_classes=NUM_CLASSES)
    spec = pool_lib.make_pool_spec(cfg.num_heads, cfg.head_kinds, cfg.num_groups)
    feats = input_features(jnp.zeros((2, 2)), jnp.ones(2))
    cond = jnp.zeros((2,), jnp.int32)

    def init(key):
        return pool_lib.init_pool(head, key, cfg.num_heads, feats, jnp.zeros(2), cond)

    return Nets(gaussian_denoise, gaussian_denoise, head, spec, init)


def toy_batch(n=16):
    x = jnp.asarray([1.0, -1.0]) + 0.5 * jax.random.normal(jax.random.key(7), (n, 2))
    return {"image": x, "label": jnp.arange(n, dtype=jnp.int32) % NUM_CLASSES}


def toy_state(cfg, nets, txs):
    return init_distill_state(STUDENT, STUDENT, nets.init_pool(jax.random.key(1)), txs, cfg, (0.9,))


def test_vsd_with_unit_weights_is_dmd2_bit_for_bit():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x, x0_p, x0_q = (jax.random.normal(k, (8, 4, 4, 1)) for k in (k1, k2, k3))
    h = f_weights(jnp.exp(jax.random.normal(k1, (8,))), "rkl")
    a = jax.value_and_grad(vsd_loss)(x, x0_p, x0_q, h)
    b = jax.value_and_grad(dmd2_loss)(x, x0_p, x0_q)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_reverse_kl_generator_loss_equals_dmd2_exactly():
    txs = tuple(optax.adam(1e-3) for _ in range(3))
    outs = {}
    for kind in ("rkl", "dmd2"):
        cfg = FDistillConfig(divergence=kind, extractor="input", gan_weight=3e-3)
        nets = toy_nets(cfg)
        state = toy_state(cfg, nets, txs)

        def loss(p, state=state, nets=nets, cfg=cfg):
            return generator_loss(
                p, (state, TEACHER), toy_batch(), jax.random.key(3), nets=nets, cfg=cfg
            )

        outs[kind] = jax.jit(jax.value_and_grad(loss, has_aux=True))(STUDENT)
    (l_rkl, (m_rkl, _)), g_rkl = outs["rkl"]
    (l_dmd, (m_dmd, _)), g_dmd = outs["dmd2"]
    np.testing.assert_array_equal(m_rkl["dm_loss"], m_dmd["dm_loss"])
    np.testing.assert_array_equal(l_rkl, l_dmd)
    jax.tree.map(np.testing.assert_array_equal, g_rkl, g_dmd)


def test_other_divergences_differ_from_dmd2():
    txs = tuple(optax.adam(1e-3) for _ in range(3))
    cfg = FDistillConfig(divergence="fkl", extractor="input")
    nets = toy_nets(cfg)
    state = toy_state(cfg, nets, txs)
    # A discriminator that prefers some samples makes r non-constant.
    state = state.replace(
        disc=state.disc.replace(params=jax.tree.map(lambda p: 5 * p, state.disc.params))
    )
    _, (m, _) = generator_loss(
        STUDENT, (state, TEACHER), toy_batch(), jax.random.key(3), nets=nets, cfg=cfg
    )
    assert float(m["h_max"]) > 1.01


def _run_steps(mesh, cfg, txs, nets, steps):
    state = toy_state(cfg, nets, txs)
    rep = replicated(mesh)
    shard = distill_state_shardings(
        jax.eval_shape(lambda: state), jax.tree.map(lambda _: rep, STUDENT), txs, mesh
    )
    gen_step, critic_step = jit_steps(steps, shard, jax.tree.map(lambda _: rep, TEACHER), mesh)
    state = jax.device_put(state, shard)
    batch, key, metrics = toy_batch(), jax.random.key(11), []
    for i in range(4):
        fn = gen_step if is_generator_step(i, 1) else critic_step
        state, m = fn(state, TEACHER, batch, key, jnp.int32(1))
        metrics.append(m)
    return jax.device_get(state), jax.device_get(metrics)


def test_sharded_step_equals_single_device_step():
    cfg = FDistillConfig(
        divergence="js",
        extractor="input",
        num_heads=3,
        head_kinds=("global_cond", "local_cond", "local_uncond"),
        num_groups=2,
        heads_per_step=2,
        refresh_fraction=1 / 3,
        r1_weight=1.0,
    )
    txs = tuple(optax.adam(1e-2) for _ in range(3))
    nets = toy_nets(cfg)
    steps = make_steps(nets, cfg, txs)
    single = _run_steps(make_mesh(devices=jax.devices()[:1]), cfg, txs, nets, steps)
    sharded = _run_steps(make_mesh(), cfg, txs, nets, steps)
    assert jax.device_count() == 8
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), single, sharded
    )
    assert int(single[0].gen.step) == 2 and int(single[0].fake.step) == 2
    assert not np.allclose(single[0].gen.params["mu"], STUDENT["mu"])


def _pool_setup(num_heads=6):
    head = DiscHead(width=8, num_classes=0)
    feats = [jnp.zeros((2, 3))]
    pool = pool_lib.init_pool(head, jax.random.key(0), num_heads, feats, jnp.zeros(2), None)
    tx = pool_lib.per_head(optax.adamw(1e-2, weight_decay=0.1))
    opt = tx.init(pool)
    grads = jax.tree.map(jnp.ones_like, pool)
    all_heads = jnp.ones((num_heads,), bool)
    pool, opt = pool_lib.masked_apply(tx, grads, opt, pool, all_heads)  # moments now non-zero
    return head, feats, tx, pool, opt


def test_pool_refresh_resets_exactly_the_chosen_heads_and_their_moments():
    head, feats, tx, pool, opt = _pool_setup()
    fresh = pool_lib.init_pool(head, jax.random.key(9), 6, feats, jnp.zeros(2), None)
    mask = pool_lib.refresh_mask(jax.random.key(4), 6, 1 / 3)
    assert int(mask.sum()) == 2
    new_pool, new_opt = pool_lib.refresh(tx, pool, opt, fresh, mask)
    chosen = np.asarray(mask)
    for new, old, fr in zip(
        jax.tree.leaves(new_pool), jax.tree.leaves(pool), jax.tree.leaves(fresh), strict=True
    ):
        np.testing.assert_array_equal(new[chosen], fr[chosen])
        np.testing.assert_array_equal(new[~chosen], old[~chosen])
    adam = new_opt[0]
    for moments, old_moments in ((adam.mu, opt[0].mu), (adam.nu, opt[0].nu)):
        for new, old in zip(jax.tree.leaves(moments), jax.tree.leaves(old_moments), strict=True):
            np.testing.assert_array_equal(new[chosen], 0.0)
            np.testing.assert_array_equal(new[~chosen], old[~chosen])
            assert np.all(old[~chosen] != 0.0) or old.size == 0
    np.testing.assert_array_equal(adam.count, np.where(chosen, 0, opt[0].count))


def test_masked_apply_leaves_unselected_heads_and_moments_alone():
    _, _, tx, pool, opt = _pool_setup()
    selected = jnp.asarray([True, False, True, False, False, False])
    grads = jax.tree.map(jnp.ones_like, pool)
    new_pool, new_opt = pool_lib.masked_apply(tx, grads, opt, pool, selected)
    sel = np.asarray(selected)
    for new, old in zip(jax.tree.leaves(new_pool), jax.tree.leaves(pool), strict=True):
        np.testing.assert_array_equal(new[~sel], old[~sel])
        assert not np.array_equal(new[sel], old[sel])
    for new, old in zip(jax.tree.leaves(new_opt[0].mu), jax.tree.leaves(opt[0].mu), strict=True):
        np.testing.assert_array_equal(new[~sel], old[~sel])


def test_pool_spec_and_groups():
    spec = pool_lib.make_pool_spec(6, ("global_cond", "local_cond", "local_uncond"), 2)
    np.testing.assert_array_equal(spec.local, [False, True, True] * 2)
    np.testing.assert_array_equal(spec.conditional, [True, True, False] * 2)
    np.testing.assert_array_equal(spec.group, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(
        pool_lib.sample_groups(jnp.asarray([0.1, 0.6, 1.0]), 2), [0, 1, 1]
    )
    with pytest.raises(ValueError, match="unknown head kinds"):
        pool_lib.make_pool_spec(2, ("global",))


def test_backward_simulation_and_few_step_sampling():
    sig = student_sigmas(4)
    assert sig.shape == (4,) and sig[0] == pytest.approx(80.0) and sig[-1] > 0.1
    np.testing.assert_allclose(student_sigmas(1), [80.0])
    gen = lambda p, x, s, c: gaussian_denoise(p, x, jnp.broadcast_to(s, x.shape[:1]), c)[0]  # noqa: E731
    noise = jax.random.normal(jax.random.key(0), (4096, 2))
    # One step: G(sigma_max z).
    x1, k = backward_simulate(gen, TEACHER, noise, None, sig[:1], jax.random.key(1))
    np.testing.assert_allclose(x1, gen(TEACHER, 80.0 * noise, 80.0, None))
    assert int(k) == 0
    # With only the first step active, k is always 0 (bottom-up refinement's stage 1).
    ks = [
        int(backward_simulate(gen, TEACHER, noise[:2], None, sig, jax.random.key(i), 1)[1])
        for i in range(8)
    ]
    assert ks == [0] * 8
    ks = {
        int(backward_simulate(gen, TEACHER, noise[:2], None, sig, jax.random.key(i))[1])
        for i in range(40)
    }
    assert ks == {0, 1, 2, 3}
    np.testing.assert_array_equal(
        [int(active_steps(s, 10, 4)) for s in (0, 9, 10, 25, 99)], [1, 1, 2, 3, 4]
    )
    # An exact denoiser sampled with re-noising lands on N(mu, s2).
    x = few_step_sample(gen, TEACHER, noise, None, sig, key=jax.random.key(2))
    np.testing.assert_allclose(x.mean(0), TEACHER["mu"], atol=0.03)
    var = 80.0**2  # x = mu + a (x_t - mu) with a = s2 / (s2 + sigma^2); re-noise adds sigma'^2
    for i, s in enumerate(sig):
        var = (0.25 / (0.25 + s**2)) ** 2 * var + (sig[i + 1] ** 2 if i + 1 < len(sig) else 0.0)
    np.testing.assert_allclose(x.var(0), var, rtol=0.1)
    # Gradients reach the params only through the last call.
    grads = jax.grad(
        lambda p: jnp.sum(backward_simulate(gen, p, noise, None, sig, jax.random.key(3))[0])
    )(TEACHER)
    assert np.isfinite(grads["mu"]).all()


def test_unet_sows_features_only_when_asked():
    from jaxdiff.distill.features import unet_features
    from jaxdiff.models import UNet

    model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    x, t = jnp.ones((2, 8, 8, 1)), jnp.zeros((2,))

    @jax.jit
    def run(key):
        variables = model.init(key, x, t)
        plain = model.apply(variables, x, t)
        out, feats = unet_features(model, variables["params"], x, t, None, ("enc0", "enc1", "mid"))
        return variables, plain, out, feats

    variables, plain, out, feats = run(jax.random.key(0, impl="unsafe_rbg"))
    assert set(variables) == {"params"}  # init sows nothing
    np.testing.assert_array_equal(plain, out)
    assert [f.shape for f in feats] == [(2, 8, 8, 8), (2, 4, 4, 16), (2, 4, 4, 16)]
    with pytest.raises(InvalidArgumentError, match="not sown"):
        unet_features(model, variables["params"], x, t, None, ("enc5",))
