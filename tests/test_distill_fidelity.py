"""Reference forms of distillation (issue 16, fidelity fixes), each against its reference.

* a refreshed pool head trains exactly like a fresh optimizer (own Adam step count);
* the ``"dmd2"`` schedule follows DMD2's ``dfake_gen_update_ratio`` rule;
* the ``"dmd2"`` head form is DMD2's ``cls_pred_branch`` layer for layer;
* time bins in sigma (FastGen's EDM form) against hand-computed assignments;
* R1 on the clean real image (FastGen's form) against a hand-built reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff.distill import pool as pool_lib
from jaxdiff.distill.fdistill import (
    FDistillConfig,
    critic_loss,
    generator_loss,
    generator_updates_before,
    iteration_updates,
    sigma_of_t,
)
from jaxdiff.distill.features import input_features
from jaxdiff.distill.heads import DiscHead, head_logits
from jaxdiff.distill.ratio import bin_coordinate, time_bin_normalize, time_bins
from jaxdiff.training.optim import make_optimizer
from tests.test_distill_steps import TEACHER, toy_batch, toy_nets, toy_state


def _head(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def test_refreshed_head_first_adam_step_equals_a_fresh_optimizers():
    head = DiscHead(width=8, num_classes=0)
    feats = [jnp.zeros((2, 3))]
    pool = pool_lib.init_pool(head, jax.random.key(0), 3, feats, jnp.zeros(2), None)
    one = make_optimizer(1e-2, grad_clip=1.0, weight_decay=0.01)  # what the runs build
    tx = pool_lib.per_head(one)
    opt = tx.init(pool)
    everyone = jnp.ones((3,), bool)
    apply = jax.jit(lambda g, o, p: pool_lib.masked_apply(tx, g, o, p, everyone))
    for i in range(5):  # moments and counts well away from a fresh optimizer's
        grads = jax.tree.map(lambda p, i=i: jnp.full_like(p, 0.3 * (i + 1)), pool)
        pool, opt = apply(grads, opt, pool)
    fresh = pool_lib.init_pool(head, jax.random.key(9), 3, feats, jnp.zeros(2), None)
    mask = jnp.asarray([False, True, False])
    pool, opt = jax.jit(lambda *a: pool_lib.refresh(tx, *a))(pool, opt, fresh, mask)
    fresh_head = _head(fresh, 1)
    # The refreshed head's state is a fresh optimizer's (moments 0, count 0) ...
    jax.tree.map(np.testing.assert_array_equal, _head(opt, 1), one.init(fresh_head))
    # ... while the others keep their step count.
    adam = opt[1][0]
    np.testing.assert_array_equal(adam.count, [5, 0, 5])
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape), pool)
    new_pool, _ = apply(grads, opt, pool)
    # Bit for bit what a brand-new pool optimizer does with the same head and gradient ...
    new_fresh, _ = apply(grads, tx.init(fresh), fresh)
    jax.tree.map(np.testing.assert_array_equal, _head(new_pool, 1), _head(new_fresh, 1))
    # ... and, to float32 rounding (vmapped vs scalar kernels), a lone optax optimizer's
    # first step. A shared step count of 5 would scale this step by about 0.5.
    updates, _ = jax.jit(one.update)(_head(grads, 1), one.init(fresh_head), fresh_head)
    expected = optax.apply_updates(fresh_head, updates)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
        _head(new_pool, 1),
        expected,
    )
    step = jax.tree.map(lambda a, b: a - b, _head(new_pool, 1), fresh_head)
    want = jax.tree.map(lambda a, b: a - b, expected, fresh_head)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), step, want)


def test_pool_optimizer_must_be_per_head():
    head = DiscHead(width=8, num_classes=0)
    pool = pool_lib.init_pool(head, jax.random.key(0), 2, [jnp.zeros((2, 3))], jnp.zeros(2), None)
    tx = optax.adam(1e-2)  # one shared count: not a per-head optimizer
    with pytest.raises(ValueError, match="per_head"):
        jax.eval_shape(
            lambda: pool_lib.masked_apply(tx, pool, tx.init(pool), pool, jnp.ones((2,), bool))
        )


@pytest.mark.parametrize("ratio", [1, 4, 5])
def test_dmd2_schedule_follows_dfake_gen_update_ratio(ratio):
    # DMD2 (main/edm/train_edm.py): COMPUTE_GENERATOR_GRADIENT = step % ratio == 0 updates
    # the generator first; the guidance (fake score + classifier) updates every step.
    gen_done = 0
    for i in range(3 * ratio):
        updates = iteration_updates(i, ratio, "dmd2")
        want = ("generator", "critic") if i % ratio == 0 else ("critic",)
        assert updates == want
        assert generator_updates_before(i, ratio, "dmd2") == gen_done
        gen_done += "generator" in updates
    counts = [iteration_updates(i, ratio, "dmd2") for i in range(ratio)]  # one cycle
    assert sum(u.count("critic") for u in counts) == ratio
    assert sum(u.count("generator") for u in counts) == 1


def test_alternate_schedule_is_fastgens_student_update_freq():
    # critic_steps critic iterations, then one generator-only iteration (cycle of c + 1).
    c = 4
    cycle = [iteration_updates(i, c) for i in range(c + 1)]
    assert cycle == [("critic",)] * c + [("generator",)]
    assert [generator_updates_before(i, c) for i in range(11)] == [0] * 5 + [1] * 5 + [2]
    with pytest.raises(ValueError, match="schedule='dmd3'"):
        iteration_updates(0, c, "dmd3")
    with pytest.raises(ValueError, match="critic_steps=0"):
        iteration_updates(0, 0, "dmd2")


def _torch_conv(x, kernel, bias, stride, pad):
    """PyTorch's Conv2d on NHWC arrays: zero padding ``pad`` each side, floor division."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = kernel.shape[0]
    n = (x.shape[1] - k) // stride + 1
    m = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], n, m, kernel.shape[-1]))
    for i in range(n):
        for j in range(m):
            patch = x[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kernel)
    return out + bias


def _torch_group_norm(x, scale, bias, groups=32, eps=1e-5):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _silu(x):
    return x / (1.0 + np.exp(-x))


def test_dmd2_head_form_is_dmd2s_cls_pred_branch():
    # DMD2 main/edm/edm_guidance.py: Conv2d(k4, s2, p1) -> GN(32) -> SiLU -> Conv2d(k4, s4,
    # p0) -> GN(32) -> SiLU -> Conv2d(k1); an 8x8 bottleneck gives one logit.
    head = DiscHead(width=32, num_classes=0, form="dmd2")
    feats = [jax.random.normal(jax.random.key(0), (2, 8, 8, 5))]
    params = head.init(jax.random.key(1), feats, jnp.zeros(2))["params"]
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {
        "b0_c0": {"kernel": (4, 4, 5, 32), "bias": (32,)},
        "b0_n0": {"scale": (32,), "bias": (32,)},
        "b0_c1": {"kernel": (4, 4, 32, 32), "bias": (32,)},
        "b0_n1": {"scale": (32,), "bias": (32,)},
        "b0_out": {"kernel": (1, 1, 32, 1), "bias": (1,)},
    }
    # Non-trivial norm affine params so the reference checks them too.
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape), params
    )
    glob, local, _ = head.apply({"params": params}, feats, jnp.zeros(2))
    assert local.shape == (2, 1)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = _torch_conv(
        np.asarray(feats[0], np.float64), p["b0_c0"]["kernel"], p["b0_c0"]["bias"], 2, 1
    )
    assert h.shape == (2, 4, 4, 32)
    h = _silu(_torch_group_norm(h, p["b0_n0"]["scale"], p["b0_n0"]["bias"]))
    h = _torch_conv(h, p["b0_c1"]["kernel"], p["b0_c1"]["bias"], 4, 0)
    assert h.shape == (2, 1, 1, 32)
    h = _silu(_torch_group_norm(h, p["b0_n1"]["scale"], p["b0_n1"]["bias"]))
    ref = _torch_conv(h, p["b0_out"]["kernel"], p["b0_out"]["bias"], 1, 0)[:, 0, 0, 0]
    np.testing.assert_allclose(glob, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(local[:, 0], ref, rtol=1e-4, atol=1e-5)
    # 16x16 -> 8x8 -> 2x2 patch logits; maps under 8x8 and widths off GroupNorm(32) refused.
    big = [jnp.zeros((2, 16, 16, 5))]
    big_params = head.init(jax.random.key(1), big, jnp.zeros(2))
    assert head.apply(big_params, big, jnp.zeros(2))[1].shape == (2, 4)
    with pytest.raises(ValueError, match="at least 8x8"):
        head.init(jax.random.key(1), [jnp.zeros((2, 4, 4, 5))], jnp.zeros(2))
    with pytest.raises(ValueError, match="multiple of 32"):
        DiscHead(width=16, form="dmd2").init(jax.random.key(1), feats, jnp.zeros(2))


def test_time_bins_in_sigma_and_in_karras_index_by_hand():
    t = jnp.asarray([0.0, 0.35, 0.5, 0.64, 0.75, 0.85, 0.93, 1.0])
    sigma = jnp.asarray([0.002, 2.5, 7.9, 8.1, 24.4, 45.3, 60.6, 80.0])
    # FastGen: 10 bins of width (80 - 0.002) / 10 = 7.9998 over sigma in [0.002, 80].
    coord, rng = bin_coordinate(t, sigma, "sigma", (0.002, 80.0))
    assert rng == (0.002, 80.0)
    np.testing.assert_array_equal(time_bins(coord, 10, rng), [0, 0, 0, 1, 3, 5, 7, 9])
    coord, rng = bin_coordinate(t, sigma, "karras_index", (0.002, 80.0))
    np.testing.assert_array_equal(time_bins(coord, 10, rng), [0, 3, 5, 6, 7, 8, 9, 9])
    # Normalisation by the sigma bins: bin 0 holds r = 1, 2, 3 (mean 2).
    r = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    coord, rng = bin_coordinate(t, sigma, "sigma", (0.002, 80.0))
    r_n, means = time_bin_normalize(r, coord, jnp.ones(10), t_range=rng)
    np.testing.assert_allclose(means, [2, 4, 1, 5, 1, 6, 1, 7, 1, 8])
    np.testing.assert_allclose(r_n, [0.5, 1.0, 1.5, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="time_bin_coordinate='t'"):
        bin_coordinate(t, sigma, "t", (0.002, 80.0))


@pytest.mark.parametrize("coordinate", ["karras_index", "sigma"])
def test_generator_loss_bins_in_the_configured_coordinate(coordinate):
    cfg = FDistillConfig(extractor="input", time_bin_coordinate=coordinate)
    nets = toy_nets(cfg)
    txs = tuple(optax.adam(1e-3) for _ in range(3))
    state = toy_state(cfg, nets, txs)
    state = state.replace(bin_means=jnp.full((10,), 7.0))  # untouched bins stay 7
    key, batch = jax.random.key(3), toy_batch()
    loss = jax.jit(
        lambda s, b, k: generator_loss(s.gen.params, (s, TEACHER), b, k, nets=nets, cfg=cfg)
    )
    _, (_, bins) = loss(state, batch, key)
    k_t = jax.random.split(key, 4)[2]  # generator_loss's key for t
    t = jax.random.uniform(k_t, (16,), jnp.float32, *cfg.gen_t_range)
    coord, rng = bin_coordinate(t, sigma_of_t(t, cfg), coordinate, (cfg.sigma_min, cfg.sigma_max))
    occupied = set(np.asarray(time_bins(coord, 10, rng)).tolist())
    assert {i for i in range(10) if float(bins[i]) != 7.0} == occupied


def test_r1_clean_form_equals_a_hand_built_reference():
    batch, key = toy_batch(8), jax.random.key(5)
    r1 = {}
    for perturb in ("noised", "clean"):
        cfg = FDistillConfig(extractor="input", r1_weight=1.0, r1_perturb=perturb)
        nets = toy_nets(cfg)
        txs = tuple(optax.adam(1e-3) for _ in range(3))
        state = toy_state(cfg, nets, txs)
        params = {"fake": state.fake.params, "disc": state.disc.params}
        loss = jax.jit(
            lambda p, s, b, k, cfg=cfg, nets=nets: critic_loss(
                p, (s, TEACHER), b, k, nets=nets, cfg=cfg
            )
        )
        _, metrics = loss(params, state, batch, key)
        r1[perturb] = metrics["r1"]
    # By hand: the real sample at t_real, and the perturbed input of each form.
    keys = jax.random.split(key, 9)
    k_tr, k_er, k_r1 = keys[6], keys[7], keys[8]
    real, cond = batch["image"], batch["label"]
    t_r = jax.random.uniform(k_tr, (8,), jnp.float32, 0.0, 1.0)
    s_r = sigma_of_t(t_r, cfg)
    x_t = real + s_r[:, None] * jax.random.normal(k_er, real.shape)
    eps = jax.random.normal(k_r1, real.shape)
    head_params = _head(state.disc.params, 0)

    def d(x):
        feats = input_features(x, s_r, 0.5)
        return head_logits(nets.head, head_params, feats, jnp.log(s_r) / 4.0, cond)[0]

    clean = jnp.mean((d(x_t) - d(real + 0.1 * eps)) ** 2)  # FastGen: not re-noised
    noised = jnp.mean((d(x_t) - d(x_t + 0.1 * eps)) ** 2)
    np.testing.assert_allclose(r1["clean"], clean, rtol=1e-5)
    np.testing.assert_allclose(r1["noised"], noised, rtol=1e-5)
    assert abs(float(clean) - float(noised)) > 1e-3 * float(noised)
