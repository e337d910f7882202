"""``--config.method=NAME``: every few-step method through the one distillation driver.

The session's tiny trained run is the teacher; each method runs two steps through
``distill_and_evaluate``, and its student is restored with ``load_run`` and sampled with
the recipe it stored, as ``python -m sample`` would. Resume is exact for a method whose
schedule lives in its state (progressive distillation's rounds, CD's target network).
"""

import jax
import numpy as np
import pytest

from jaxdiff.errors import InvalidArgumentError

# method -> (solver stored, steps sampled by default, NFE of that default); None = the
# teacher's (a guidance-distilled student samples with the teacher's Heun steps).
RECIPES = {
    "cd": ("renoise:sigma_min=0.002", 1, 1),
    "ct": ("renoise", 1, 1),
    "scm": ("renoise", 1, 1),
    "meanflow": ("meanflow", 1, 1),
    "progressive": ("euler", 2, 2),
    "guidance_distill": ("heun", None, None),
}
# Each driver run compiles its step and a sampler (~35 s here): the default run covers the
# three recipes no unit test covers end to end; the others' steps have their own tests.
SLOW = ("ct", "scm", "progressive")


@pytest.fixture
def teacher_dir(trained_run):
    """The session's tiny trained run (conftest), read-only: distillation only reads it."""
    return trained_run


def _config(teacher_dir, method, num_steps=2, grid=0):
    from train.configs.distill_digits import get_config

    cfg = get_config()
    cfg.method = method
    cfg.teacher = str(teacher_dir)
    cfg.train.num_steps = num_steps
    cfg.train.batch_size = 16
    cfg.train.log_every = 1
    cfg.train.checkpoint_every = 2
    cfg.sample.grid_size = grid
    cfg.progressive.start_steps = 4
    cfg.progressive.rounds = 1  # 4 -> 2 steps after the first round
    cfg.progressive.steps_per_round = 2
    cfg.guidance_distill.sample_scale = 3.0
    return cfg


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in RECIPES]
)
def test_each_method_trains_and_its_student_samples_as_stored(teacher_dir, tmp_path, method):
    from jaxdiff.experiment import distill_and_evaluate, generate_samples, load_run, resolve_sampler

    grid = 4 if method == "meanflow" else 0  # the grid is drawn by the same generate_samples
    state = distill_and_evaluate(_config(teacher_dir, method, grid=grid), tmp_path)
    assert int(state.step) == 2 and int(state.gen.step) == 2
    run = load_run(tmp_path)
    assert run.step == 2 and run.config.distill_config.method == method
    jax.tree.map(np.testing.assert_array_equal, run.params, jax.device_get(state.gen.ema["0.99"]))
    solver, steps, nfe = RECIPES[method]
    if steps is None:
        steps = int(run.config.sample.steps)
        nfe = 2 * steps - 1  # Heun, one evaluation a step: CFG is the student's input
    spec = resolve_sampler(run.config.sample, num_classes=run.num_classes)
    assert spec.solver_spec == solver and spec.steps == steps
    x, got_nfe = generate_samples(run, spec, num=4, labels=np.arange(4) % 10, seed=0)
    assert got_nfe == nfe and np.isfinite(x).all() and x.shape == (4, 8, 8, 1)
    assert (tmp_path / "samples" / "student.png").exists() == (grid > 0)
    if method == "guidance_distill":
        assert spec.guidance is None and spec.model_kwargs == {"aux_time": 3.0}
        assert run.model.aux_time_embed
    if method == "cd":
        assert run.formulation.sigma_min == 0.002  # the consistency boundary, as trained


def test_resume_is_exact_across_a_progressive_round(teacher_dir, tmp_path):
    """Two steps, stop, two more equals four straight, across a round boundary of
    progressive distillation (teacher swap, optimizer and EMA reset inside the step)."""
    from jaxdiff.experiment import distill_and_evaluate

    for method in ("progressive",):
        straight = distill_and_evaluate(_config(teacher_dir, method, 4), tmp_path / f"{method}1")
        distill_and_evaluate(_config(teacher_dir, method, 2), tmp_path / f"{method}2")
        resumed = distill_and_evaluate(_config(teacher_dir, method, 4), tmp_path / f"{method}2")
        jax.tree.map(
            np.testing.assert_array_equal, jax.device_get(straight), jax.device_get(resumed)
        )


def test_method_errors_name_the_fix(teacher_dir, tmp_path):
    from jaxdiff.experiment import distill_and_evaluate
    from jaxdiff.experiment.distill import resolve_method

    cfg = _config(teacher_dir, "nope")
    with pytest.raises(InvalidArgumentError, match="not a distillation method: choose one of"):
        resolve_method(cfg)
    cfg = _config(teacher_dir, "distill")  # f-distill's old name
    assert resolve_method(cfg).method == "fdistill"
    cfg.train.num_steps = None
    assert resolve_method(cfg).train.num_steps == cfg.distill.num_steps
    cfg = _config(teacher_dir, "cd")
    cfg.cd.metric = "l3"
    with pytest.raises(InvalidArgumentError, match=r"config.cd: metric='l3'.*--config.cd.KEY"):
        distill_and_evaluate(cfg, tmp_path / "bad")
