"""Distillation loop, student checkpoint layout and the hybrid sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.distill.few_step import student_sigmas
from jaxdiff.distill.hybrid import STUDENT_KEY_TAG, hybrid_sample
from jaxdiff.samplers import get_solver, sample
from jaxdiff.samplers.base import step_keys
from jaxdiff.training import Checkpointer
from jaxdiff.utils.rng import per_sample_keys, start_noise


def _gauss(mu, s2=0.25):
    def d(x, sigma, cond=None):
        sig2 = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])[:, None] ** 2
        return mu + s2 / (s2 + sig2) * (x - mu)

    return d


def test_hybrid_sampler_switches_models():
    base, student = _gauss(jnp.asarray([1.0, 0.0])), _gauss(jnp.asarray([0.0, 5.0]))
    noise = jax.random.normal(jax.random.key(0), (256, 2))
    sigmas = karras_sigmas(6)  # 80, 24.4, 5.84, 0.965, 0.085, 0.002
    euler = get_solver("euler")
    # switch 0: the one-step student alone, G(sigma_max z).
    x, aux = hybrid_sample(base, student, noise, sigmas, 0, solver=euler, student_levels=[80.0])
    np.testing.assert_allclose(x, student(80.0 * noise, 80.0), atol=1e-4)
    assert int(aux["nfe"]) == 1
    # switch 2 with a 4-step student (80, 17.5, 2.52, 0.17): two base Euler steps, the
    # second landing on 2.52 (the highest trained level <= sigmas[2] = 5.84), then the
    # student at 2.52 and 0.17, re-noised between them.
    levels = student_sigmas(4)
    key = jax.random.key(1)
    x, aux = hybrid_sample(
        base, student, noise, sigmas, 2, solver=euler, student_levels=levels, key=key
    )
    assert int(aux["nfe"]) == 2 + 2
    x2, _ = sample(base, noise, [sigmas[0], sigmas[1], levels[2]], solver=euler)
    tail_keys = jax.vmap(lambda k: jax.random.fold_in(k, STUDENT_KEY_TAG))(
        per_sample_keys(key, 256)
    )
    eps = start_noise(step_keys(tail_keys, jnp.int32(0))[0], (2,))
    want = student(student(x2, levels[2]) + levels[3] * eps, levels[3])
    np.testing.assert_allclose(x, want, atol=1e-4)
    with pytest.raises(ValueError, match="switch_step"):
        hybrid_sample(base, student, noise, sigmas, 6, solver=euler, student_levels=levels)
    # A one-step student is trained at sigma_max only: a later hand-over is refused.
    with pytest.raises(ValueError, match="trained only at noise levels 80"):
        hybrid_sample(base, student, noise, sigmas, 3, solver=euler, student_levels=[80.0])


@pytest.mark.slow
def test_distill_loop_writes_a_loadable_one_step_student(tmp_path):
    from jaxdiff.experiment import (
        distill_and_evaluate,
        generate_samples,
        hybrid_generate_samples,
        load_run,
        resolve_sampler,
        train_and_evaluate,
    )
    from tests.tiny import tiny_config
    from train.configs.distill_digits import get_config

    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    tcfg = tiny_config(num_steps=4)
    tcfg.model.ch_mult = (1, 2)
    train_and_evaluate(tcfg, teacher_dir)
    cfg = get_config()
    cfg.teacher = str(teacher_dir)
    cfg.distill.feature_names = ("enc0", "mid")
    cfg.distill.head_width = 8
    cfg.distill.critic_steps = 1
    cfg.distill.divergence = "js"
    cfg.distill.student_steps = 2  # levels 80 and 2.52: sampled as trained, with re-noising
    cfg.train.num_steps = 4
    cfg.train.batch_size = 16
    cfg.train.log_every = 2
    cfg.train.checkpoint_every = 2
    cfg.sample.grid_size = 4
    state = distill_and_evaluate(cfg, student_dir)
    assert int(state.gen.step) == 2 and int(state.fake.step) == 2
    run = load_run(student_dir)
    assert run.step == 4
    jax.tree.map(np.testing.assert_array_equal, run.params, jax.device_get(state.gen.ema["0.99"]))
    labels = np.arange(4) % 10
    spec = resolve_sampler(run.config.sample, num_classes=10)  # the stored recipe
    assert spec.solver_spec == "renoise" and spec.steps == 2 and spec.guidance is None
    np.testing.assert_array_equal(spec.sigmas, [*student_sigmas(2), 0.0])
    x, nfe = generate_samples(run, spec, num=4, labels=labels, seed=0)
    assert nfe == 2 and np.isfinite(x).all()
    teacher = load_run(teacher_dir)
    base = resolve_sampler(teacher.config.sample, num_classes=10, solver="euler", steps=4)
    # sigmas[1] = 9.72: the CFG Euler step (2) lands on 2.52, then the student's last level.
    y, nfe = hybrid_generate_samples(
        teacher, run, base, switch_step=1, num=4, labels=labels, seed=0
    )
    assert nfe == 2 + 1 and y.shape == x.shape
    # Resume: a second call with more steps continues from the saved state.
    cfg.train.num_steps = 6
    state = distill_and_evaluate(cfg, student_dir)
    assert int(state.step) == 6
    # A run that goes non-finite stops at its next log step, after the last save has
    # landed, and leaves the checkpoints it had intact.
    cfg.train.num_steps = 10
    cfg.optim.learning_rate = 1e30
    cfg.critic_optim.learning_rate = 1e30
    with pytest.raises(FloatingPointError, match=r"non-finite.*last good checkpoint \(step 6\)"):
        distill_and_evaluate(cfg, student_dir)
    steps = Checkpointer(student_dir / "checkpoints").all_steps()
    assert max(steps) == 6
    assert load_run(student_dir).step == 6
