"""Guidance distillation: the loss against a float64 reference on closed-form Gaussian
denoisers, the zero-initialised w embedding on a grafted UNet, a real step, sharding.

The teacher's branches are exact Gaussian denoisers, ``D_k(x, sigma) = mu_k + s_k^2 /
(s_k^2 + sigma^2) (x - mu_k)``, one Gaussian per class ``k`` and another for the null
class; the exact student returns ``D_u + w (D_c - D_u)`` for the ``w`` it decodes from
``aux_time``, so the guided target and the loss are known in closed form.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import run_sharded_steps

from jaxdiff.diffusion import EDM
from jaxdiff.diffusion.formulation import expand_to
from jaxdiff.distill.guidance_distill import (
    GuidanceDistillConfig,
    draw_inputs,
    graft_params,
    guided_student_denoiser,
    init_guidance_distill_state,
    make_guidance_distill_loss,
    make_guidance_distill_step,
    sample_w,
    teacher_cfg_target,
)
from jaxdiff.models.unet import UNet
from jaxdiff.parallel import make_mesh

EDM_F = EDM(sigma_data=0.5)
NUM_CLASSES = 3
MUS = np.array([-0.5, 0.2, 0.7, 0.1])  # classes 0..2, then the null class (index 3)
SS = np.array([0.6, 0.8, 0.5, 0.9])
AUX_SCALE = 2.0
CFG = GuidanceDistillConfig(w_min=1.0, w_max=4.0, num_classes=NUM_CLASSES, aux_scale=AUX_SCALE)


def _gauss_d(x, sigma, label):
    mu = expand_to(jnp.asarray(MUS, jnp.float32)[label], x)
    s2 = expand_to(jnp.asarray(SS, jnp.float32)[label] ** 2, x)
    return mu + s2 / (s2 + expand_to(sigma, x) ** 2) * (x - mu)


def _raw(d_fn):
    """A raw EDM network whose preconditioned denoiser is ``d_fn(x, sigma, ...)``."""

    def net(params, x_in, label, cond, **kwargs):
        sigma = EDM_F.sigma_from_noise_label(label)
        c = EDM_F.precondition(sigma)
        x = x_in / expand_to(c.c_in, x_in)
        d = d_fn(params, x, sigma, cond, **kwargs)
        return (d - expand_to(c.c_skip, x) * x) / expand_to(c.c_out, x)

    return net


teacher_net = _raw(lambda params, x, sigma, cond: _gauss_d(x, sigma, cond))


def _student_d(params, x, sigma, cond, aux_time):
    """Exact CFG at ``w = aux_time / AUX_SCALE``, off by ``dw`` in w and ``b x``."""
    w = aux_time / AUX_SCALE + params["dw"]
    d_c, d_u = _gauss_d(x, sigma, cond), _gauss_d(x, sigma, jnp.full_like(cond, NUM_CLASSES))
    return d_u + expand_to(w, x) * (d_c - d_u) + params["b"] * x


student_net = _raw(_student_d)


def _np_loss(x0, labels, sigma, eps, w, dw, b):
    """float64 reference: mean of lambda(sigma) mean_pixels((D_s - D_w)^2)."""
    x0, sigma, eps, w = (np.asarray(a, np.float64) for a in (x0, sigma, eps, w))
    col = lambda v: v.reshape(-1, *([1] * (x0.ndim - 1)))  # noqa: E731
    x = x0 + col(sigma) * eps

    def d(k):
        mu, s2 = col(MUS[k]), col(SS[k] ** 2)
        return mu + s2 / (s2 + col(sigma) ** 2) * (x - mu)

    d_c, d_u = d(labels), d(np.full_like(labels, NUM_CLASSES))
    target = d_u + col(w) * (d_c - d_u)
    d_s = d_u + col(w + dw) * (d_c - d_u) + b * x
    sd = EDM_F.sigma_data
    lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return np.mean(lam * np.mean(((d_s - target) ** 2).reshape(len(x), -1), axis=1))


def _data(key, n, shape=(2, 2, 1)):
    k_x, k_y = jax.random.split(jax.random.key(key))
    labels = jax.random.randint(k_y, (n,), 0, NUM_CLASSES)
    x0 = jnp.asarray(MUS, jnp.float32)[labels].reshape(n, 1, 1, 1) + 0.5 * jax.random.normal(
        k_x, (n, *shape)
    )
    return {"image": x0, "label": labels}


def test_loss_is_zero_for_the_exact_student_and_matches_a_float64_reference():
    loss_fn = jax.jit(make_guidance_distill_loss(student_net, teacher_net, EDM_F, CFG))
    batch = _data(0, 64)
    key = jax.random.key(7)
    exact = {"dw": jnp.float32(0.0), "b": jnp.float32(0.0)}
    loss, metrics = loss_fn(exact, None, batch, key)
    assert float(loss) < 1e-8, float(loss)
    perturbed = {"dw": jnp.float32(0.3), "b": jnp.float32(0.05)}
    loss, metrics = loss_fn(perturbed, None, batch, key)
    sigma, eps, w = draw_inputs(key, batch["image"], EDM_F, CFG)
    ref = _np_loss(batch["image"], np.asarray(batch["label"]), sigma, eps, w, 0.3, 0.05)
    assert ref > 1e-3
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["w_mean"]), float(np.mean(w)), rtol=1e-6)
    # w is per sample in [w_min, w_max]; sigma follows the teacher's EDM distribution.
    assert float(jnp.min(w)) >= 1.0 and float(jnp.max(w)) <= 4.0 and float(jnp.std(w)) > 0.5
    np.testing.assert_array_equal(sigma, EDM_F.sample_sigma(jax.random.split(key, 3)[0], (64,)))


def test_teacher_target_is_one_2b_batch_without_aux_time():
    calls = []

    def spy(params, x_in, label, cond, **kwargs):
        calls.append((x_in.shape, np.asarray(cond), kwargs))
        return teacher_net(params, x_in, label, cond)

    batch = _data(1, 4)
    x, sigma = batch["image"], jnp.asarray([0.1, 0.5, 1.0, 3.0])
    w = jnp.asarray([1.0, 2.0, 0.0, 3.5])
    target = teacher_cfg_target(spy, None, EDM_F, x, sigma, batch["label"], w, NUM_CLASSES)
    (shape, cond, kwargs), *rest = calls
    assert not rest and shape == (8, 2, 2, 1) and kwargs == {}
    np.testing.assert_array_equal(cond, np.r_[np.asarray(batch["label"]), [3, 3, 3, 3]])
    d_c, d_u = _gauss_d(x, sigma, batch["label"]), _gauss_d(x, sigma, jnp.full((4,), 3))
    np.testing.assert_allclose(target[0], d_c[0], atol=1e-6)  # w = 1: conditional
    np.testing.assert_allclose(target[2], d_u[2], atol=1e-6)  # w = 0: unconditional
    np.testing.assert_allclose(target, d_u + expand_to(w, x) * (d_c - d_u), atol=1e-6)


def test_guided_student_denoiser_passes_aux_scale_times_w():
    seen = []

    def spy(params, x_in, label, cond, **kwargs):
        seen.append(np.asarray(kwargs["aux_time"]))
        return params * x_in

    x, sigma = jnp.ones((3, 2, 2, 1)), jnp.asarray([0.2, 1.0, 5.0])
    for w, want in ((2.5, [1.25] * 3), (jnp.asarray([1.0, 2.0, 4.0]), [0.5, 1.0, 2.0])):
        out = guided_student_denoiser(spy, 2.0, EDM_F, w, aux_scale=0.5)(x, sigma, None)
        np.testing.assert_allclose(seen.pop(), want)
        c = EDM_F.precondition(sigma)
        want_d = expand_to(c.c_skip, x) * x + expand_to(c.c_out * 2.0 * c.c_in, x) * x
        np.testing.assert_allclose(out, want_d, rtol=1e-6)


def test_config_and_input_checks():
    with pytest.raises(ValueError, match="num_classes"):
        GuidanceDistillConfig()
    with pytest.raises(ValueError, match="w_min"):
        GuidanceDistillConfig(w_min=3.0, w_max=2.0, num_classes=3)
    with pytest.raises(ValueError, match="w_sampling"):
        GuidanceDistillConfig(w_sampling="normal", num_classes=3)
    with pytest.raises(ValueError, match="aux_scale"):
        GuidanceDistillConfig(aux_scale=0.0, num_classes=3)
    w = sample_w(jax.random.key(0), 8, GuidanceDistillConfig(w_min=2.0, w_max=2.0, num_classes=3))
    np.testing.assert_array_equal(w, 2.0)
    loss_fn = make_guidance_distill_loss(student_net, teacher_net, EDM_F, CFG)
    with pytest.raises(ValueError, match="label"):
        loss_fn({}, None, {"image": jnp.zeros((2, 2, 2, 1))}, jax.random.key(0))


UNET_KW = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
TEACHER = UNet(**UNET_KW, num_classes=NUM_CLASSES)
STUDENT = UNet(**UNET_KW, num_classes=NUM_CLASSES, aux_time_embed=True)
SHAPE = (4, 8, 8, 1)


def apply_teacher(params, x, label, cond, **kwargs):
    return TEACHER.apply({"params": params}, x, label, cond, **kwargs)


def apply_student(params, x, label, cond, **kwargs):
    return STUDENT.apply({"params": params}, x, label, cond, **kwargs)


def _teacher_params(seed=0):
    """Noise-filled teacher params (its zero-initialised layers would hide the labels)."""
    x, t, c = jnp.zeros(SHAPE), jnp.zeros(SHAPE[:1]), jnp.zeros(SHAPE[:1], jnp.int32)
    shapes = nn.unbox(jax.eval_shape(lambda: TEACHER.init(jax.random.key(0), x, t, c)["params"]))
    rng = np.random.default_rng(seed)
    fill = lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32)  # noqa: E731
    return jax.tree.map(fill, shapes)


@pytest.fixture(scope="session")
def unet_params():
    """(teacher params, the student's fresh init, the grafted student)."""
    teacher = _teacher_params()
    x, t, c = jnp.zeros(SHAPE), jnp.zeros(SHAPE[:1]), jnp.zeros(SHAPE[:1], jnp.int32)
    fresh = nn.unbox(jax.jit(STUDENT.init)(jax.random.key(1), x, t, c)["params"])
    return teacher, fresh, graft_params(teacher, fresh)


def test_grafted_unet_student_is_the_conditional_teacher_at_every_w(unet_params):
    teacher, fresh, student = unet_params
    assert set(student) - set(teacher) == {"aux_time_embed"}
    jax.tree.map(np.testing.assert_array_equal, {k: student[k] for k in teacher}, teacher)
    jax.tree.map(np.testing.assert_array_equal, student["aux_time_embed"], fresh["aux_time_embed"])
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    sigma = jnp.asarray([0.05, 0.4, 1.5, 20.0])
    labels = jnp.asarray([0, 1, 2, 1])
    d_teacher = jax.jit(EDM_F.as_denoiser(lambda *a: apply_teacher(teacher, *a)))(x, sigma, labels)
    w = jnp.asarray([1.0, 2.5, 4.0, 7.0])
    d_student = jax.jit(
        lambda p, ww: guided_student_denoiser(apply_student, p, EDM_F, ww, AUX_SCALE)(
            x, sigma, labels
        )
    )
    np.testing.assert_allclose(d_student(student, w), d_teacher, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d_student(student, w[::-1]), d_teacher, rtol=1e-6, atol=1e-6)


def test_graft_params_names_mismatches(unet_params):
    teacher, fresh, _ = unet_params
    extra = dict(teacher, head={"kernel": jnp.zeros((2,))})
    with pytest.raises(ValueError, match=r"\['head/kernel'\] have no counterpart"):
        graft_params(extra, fresh)
    grow = lambda a: jnp.zeros((a.shape[0] + 1, *a.shape[1:]))  # noqa: E731
    wrong = dict(teacher, class_embed=jax.tree.map(grow, teacher["class_embed"]))
    with pytest.raises(ValueError, match="class_embed.*shape"):
        graft_params(wrong, fresh)
    partial = {k: v for k, v in teacher.items() if k != "class_embed"}
    with pytest.raises(ValueError, match="student param 'class_embed.* not in the teacher"):
        graft_params(partial, fresh)


def test_one_unet_step_reaches_the_w_embedding(unet_params):
    teacher, _, student = unet_params
    tx = optax.adam(1e-3)
    state = init_guidance_distill_state(jax.random.key(0), student, tx, CFG, ema_rates=(0.9,))
    step = jax.jit(make_guidance_distill_step(apply_student, apply_teacher, EDM_F, CFG, tx))
    batch = _data(3, SHAPE[0], SHAPE[1:])
    new, metrics = step(state, teacher, batch, jax.random.key(4))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["loss"]) > 0 and float(metrics["grad_norm"]) > 0
    assert 1.0 <= float(metrics["w_mean"]) <= 4.0
    assert int(new.step) == 1 and int(new.gen.step) == 1 and "0.9" in new.gen.ema
    before = student["aux_time_embed"]["fc2"]["kernel"]
    after = new.gen.params["aux_time_embed"]["fc2"]["kernel"]
    assert float(jnp.max(jnp.abs(before))) == 0.0 and float(jnp.max(jnp.abs(after))) > 1e-4


def test_sharded_step_equals_single_device_step():
    tx = optax.adam(1e-2)
    params = {"dw": jnp.float32(0.3), "b": jnp.float32(0.05)}
    state = init_guidance_distill_state(jax.random.key(0), params, tx, CFG, ema_rates=(0.9,))
    step = make_guidance_distill_step(student_net, teacher_net, EDM_F, CFG, tx)
    # run_sharded_steps feeds {"image": b}: b carries the labelled batch itself.
    labelled = lambda s, tp, b, k: step(s, tp, b["image"], k)  # noqa: E731
    batches = [_data(10 + i, 16) for i in range(2)]
    single = run_sharded_steps(make_mesh(devices=jax.devices()[:1]), labelled, state, batches)
    sharded = run_sharded_steps(make_mesh(), labelled, state, batches)
    assert jax.device_count() == 8
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(close, single, sharded)
    final, metrics = sharded
    assert int(final.step) == 2 and abs(float(final.gen.params["dw"])) < 0.3
    assert 1.0 <= float(metrics["w_mean"]) <= 4.0
