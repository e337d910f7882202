"""Distillation loop, student checkpoint layout and the hybrid sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.distill.hybrid import hybrid_sample, student_tail
from jaxdiff.samplers import get_solver
from jaxdiff.training import Checkpointer


def _gauss(mu, s2=0.25):
    def d(x, sigma, cond=None):
        sig2 = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])[:, None] ** 2
        return mu + s2 / (s2 + sig2) * (x - mu)

    return d


def test_hybrid_sampler_switches_models():
    base, student = _gauss(jnp.asarray([1.0, 0.0])), _gauss(jnp.asarray([0.0, 5.0]))
    noise = jax.random.normal(jax.random.key(0), (256, 2))
    sigmas = karras_sigmas(6)
    euler = get_solver("euler")
    # switch 0: the one-step student alone, G(sigma_max z).
    x, aux = hybrid_sample(base, student, noise, sigmas, 0, solver=euler, student_levels=[80.0])
    np.testing.assert_allclose(x, student(80.0 * noise, 80.0), atol=1e-4)
    assert int(aux["nfe"]) == 1
    # switch 3: three base Euler steps, then one student call at sigmas[3].
    x, aux = hybrid_sample(base, student, noise, sigmas, 3, solver=euler, student_levels=[80.0])
    assert int(aux["nfe"]) == 4
    from jaxdiff.samplers import sample

    x3, _ = sample(base, noise, sigmas[:4], solver=euler)
    np.testing.assert_allclose(x, student(x3, sigmas[3]), atol=1e-4)
    np.testing.assert_allclose(student_tail(10.0, [80.0, 15.0, 2.5, 0.3]), [10.0, 2.5, 0.3, 0.0])
    with pytest.raises(ValueError, match="switch_step"):
        hybrid_sample(base, student, noise, sigmas, 6, solver=euler)


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
    spec = resolve_sampler(run.config.sample, num_classes=10)  # the stored one-step sampler
    assert spec.solver_spec == "euler" and spec.steps == 1 and spec.guidance is None
    x, nfe = generate_samples(run, spec, num=4, labels=labels, seed=0)
    assert nfe == 1 and np.isfinite(x).all()
    teacher = load_run(teacher_dir)
    base = resolve_sampler(teacher.config.sample, num_classes=10, solver="euler", steps=4)
    y, nfe = hybrid_generate_samples(
        teacher, run, base, switch_step=1, num=4, labels=labels, seed=0
    )
    assert nfe == 2 + 1 and y.shape == x.shape  # one CFG Euler step (2), then the student
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
