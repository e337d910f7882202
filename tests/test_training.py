"""The train loop: loss goes down, resume is exact, failures are loud and lose nothing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from jaxdiff.experiment import build_experiment, init_state, train_and_evaluate
from jaxdiff.training import Checkpointer, abstract_state, drop_labels, make_loss_fn


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_twenty_steps_lower_the_loss(tmp_path):
    config = tiny_config(20)
    config.sample.grid_size = 8
    exp = build_experiment(config)
    ckpt = Checkpointer(tmp_path / "unused")
    state0, _ = init_state(exp, ckpt)
    batch = exp.to_model_batch(next(exp.data))
    loss_fn = make_loss_fn(exp.model, exp.formulation, num_classes=10, label_dropout=0.0)
    key = jax.random.key(42)
    before = float(loss_fn(state0.params, batch, key)[0])
    state = train_and_evaluate(config, tmp_path / "run")
    after = float(loss_fn(state.params, batch, key)[0])
    assert after < 0.8 * before, (before, after)
    assert int(state.step) == 20
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [5, 10, 15, 20]
    assert all(x["images_per_s"] > 0 for x in lines)
    assert (tmp_path / "run" / "samples" / "step_000020.png").exists()


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    # Two separate runs of the same config and seed (one of them killed and resumed) give
    # bit-identical losses and state: this is also the run-to-run determinism test.
    full = train_and_evaluate(tiny_config(10), tmp_path / "full")
    train_and_evaluate(tiny_config(5), tmp_path / "split")  # "killed" after step 5
    resumed = train_and_evaluate(tiny_config(10), tmp_path / "split")
    assert int(resumed.step) == 10
    # Same params, EMA and optimizer state bit for bit: same data order and same noise.
    _leaves_equal(resumed, full)
    losses = lambda d: [  # noqa: E731
        json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses("split") == losses("full")


def test_checkpoint_restores_bit_identical_state(tmp_path):
    config = tiny_config(5)
    state = train_and_evaluate(config, tmp_path)
    exp = build_experiment(config)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    restored, data_state, step = ckpt.restore(abstract_state(exp.init_fn, exp.state_shardings))
    assert step == 5 and data_state is not None
    _leaves_equal(restored, state)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    train_and_evaluate(tiny_config(5), tmp_path)
    bad = tiny_config(10)
    bad.optim.learning_rate = 1e30
    with pytest.raises(FloatingPointError, match="non-finite.*step 5"):
        train_and_evaluate(bad, tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [5]
    exp = build_experiment(tiny_config(5))
    restored, _, _ = ckpt.restore(abstract_state(exp.init_fn, exp.state_shardings))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored.params))


def test_bad_config_values_fail_at_once_with_the_fix(tmp_path):
    config = tiny_config(5)
    config.train.batch_size = 12
    with pytest.raises(ValueError, match=r"batch_size=12 .*8 batch shards.*multiple of 8"):
        build_experiment(config)
    config = tiny_config(5)
    config.train.num_steps = 0
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        build_experiment(config)
    config = tiny_config(5)
    config.mesh.fsdp = 3
    with pytest.raises(ValueError, match="fsdp=3"):
        build_experiment(config)
    config = tiny_config(5)
    config.data.name = "digitz"
    with pytest.raises(ValueError, match="unknown dataset 'digitz'"):
        build_experiment(config)


def test_label_dropout_uses_the_null_class():
    labels = jnp.arange(1000) % 10
    dropped = drop_labels(jax.random.key(0), labels, 10, 0.25)
    frac = float(jnp.mean(dropped == 10))
    assert 0.2 < frac < 0.3
    np.testing.assert_array_equal(np.where(dropped != 10, dropped, labels), labels)
    assert drop_labels(jax.random.key(0), labels, 10, 0.0) is labels


def test_in_loop_evaluation_writes_metrics(tmp_path):
    config = tiny_config(4)
    config.eval.name = "fd_digits"
    config.eval.every = 2
    config.eval.num = 32
    config.eval.batch_size = 16
    train_and_evaluate(config, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/fd_digits" in x]
    assert [x["step"] for x in evals] == [2, 4]
    assert all(
        np.isfinite(x["eval/fd_digits"]) and 0 <= x["eval/class_accuracy"] <= 1 for x in evals
    )


def test_in_loop_evaluation_and_grids_run_with_autoguidance(tmp_path, trained_run):
    # The same guidance string works in config.sample as on the command line, also for
    # methods that load something (here the guiding run of autoguidance).
    config = tiny_config(2)
    config.sample.guidance = f"autoguidance:2.0,guide={trained_run}"
    config.sample.grid_size = 4
    config.eval.name, config.eval.every, config.eval.num, config.eval.batch_size = (
        "fd_digits", 2, 16, 16,
    )  # fmt: skip
    train_and_evaluate(config, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "eval/fd_digits" in x] == [2]
    assert (tmp_path / "run" / "samples" / "step_000002.png").exists()


def test_a_bad_sampler_spec_fails_before_the_first_step(tmp_path):
    from jaxdiff.errors import InvalidArgumentError

    config = tiny_config(2)
    config.sample.guidance = "cfgg:2.0"
    with pytest.raises(InvalidArgumentError, match="cfgg"):
        train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_power_ema_in_the_train_step_equals_float64_power_ema(tmp_path):
    # EMA profiles given by relative std ride beside a constant rate in the jitted step and
    # equal EDM2's float64 power EMA of the params after each update (the first one copied).
    from jaxdiff.parallel import global_batch
    from jaxdiff.training import jit_train_step, make_train_step
    from jaxdiff.training.phema import std_to_exp

    config = tiny_config(6, ema_rates=(0.9,), ema_stds=(0.05, 0.1))
    exp = build_experiment(config)
    state, _ = init_state(exp, Checkpointer(tmp_path / "unused"))
    assert set(state.ema) == {"0.9", "std0.050", "std0.100"}
    step = jit_train_step(
        make_train_step(exp.model, exp.formulation, exp.tx, num_classes=exp.num_classes),
        exp.state_shardings,
        exp.mesh,
    )
    key, trajectory = jax.random.key(0), []
    for _ in range(6):
        batch = global_batch(exp.to_model_batch(next(exp.data)), exp.mesh)
        state, _ = step(state, batch, key)
        # The state is donated to the next step: copy the params out now.
        trajectory.append(jax.tree.map(lambda x: np.array(x, np.float64), state.params))
        if len(trajectory) == 1:
            _leaves_equal(state.ema["std0.100"], state.params)
    for std in (0.05, 0.1):
        gamma, ema = std_to_exp(std), trajectory[0]
        for t, params in enumerate(trajectory[1:], start=2):
            beta = (1 - 1 / t) ** (gamma + 1)
            ema = jax.tree.map(lambda e, p, b=beta: b * e + (1 - b) * p, ema, params)
        for got, want in zip(
            jax.tree.leaves(state.ema[f"std{std:.3f}"]), jax.tree.leaves(ema), strict=True
        ):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_inverse_sqrt_schedule_is_edm2s():
    from jaxdiff.training.optim import inverse_sqrt_schedule, make_optimizer

    def edm2(cur_nimg, batch_size, ref_lr, ref_batches, rampup_mimg):
        # EDM2's training_loop.learning_rate_schedule, written out in float64.
        lr = ref_lr / np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
        return lr * min(cur_nimg / (rampup_mimg * 1e6), 1) if rampup_mimg > 0 else lr

    # EDM2 units: ref_batches is t_ref in steps; rampup_Mimg * 1e6 / batch is the warm-up.
    sched = inverse_sqrt_schedule(0.012, warmup_steps=10_000, ref_steps=70_000)
    for step in (0, 1, 5_000, 10_000, 70_000, 140_000, 280_000, 1_000_000):
        want = edm2(step * 1000, 1000, 0.012, 70_000, 10)
        assert float(sched(step)) == pytest.approx(want, rel=1e-6, abs=1e-12), step
    no_warmup = inverse_sqrt_schedule(1.0, warmup_steps=0, ref_steps=100)
    assert [float(no_warmup(s)) for s in (0, 100, 400)] == [1.0, 1.0, 0.5]

    # Wired into Adam: with a constant gradient Adam's step is the learning rate itself (up
    # to eps and float32 rounding of the bias corrections).
    tx = make_optimizer(
        1.0, warmup_steps=4, decay_steps=8, schedule="inverse_sqrt", grad_clip=None, b2=0.99
    )
    params = jnp.zeros(())
    opt_state = tx.init(params)
    ref = inverse_sqrt_schedule(1.0, 4, 8)
    for k in range(40):
        updates, opt_state = tx.update(jnp.ones(()), opt_state, params)
        assert float(-updates) == pytest.approx(float(ref(k)), rel=1e-5, abs=1e-12), k


def test_schedule_and_power_ema_config_values_fail_with_the_fix():
    from jaxdiff.errors import InvalidArgumentError
    from jaxdiff.experiment.builders import build_optimizer, check_loop_config

    cases = [
        ({"optim.schedule": "linear"}, r"optim.schedule must be one of \['cosine'"),
        ({"optim.schedule": "inverse_sqrt"}, r"optim.decay_steps must be an integer >= 1"),
        ({"optim.schedule": "constant", "optim.decay_steps": 100}, "decay_steps=None"),
        ({"train.ema_stds": (0.3,)}, r"train.ema_stds must be .*\(0, 0.289\)"),
        ({"train.ema_stds": (0.0505,)}, "at most 3 decimals"),
        ({"train.ema_stds": (0.1, 0.1)}, "distinct"),
        ({"train.phema_every": 5}, r"ema_stds is empty.*ema_stds=\(0.05,0.1\)"),
        ({"train.ema_stds": (0.1,), "train.phema_every": -1}, "phema_every must be >= 0"),
    ]
    for changes, match in cases:
        config = tiny_config(2)
        for key, value in changes.items():
            section, name = key.split(".")
            config[section][name] = value
        with pytest.raises(InvalidArgumentError, match=match):
            check_loop_config(config)
            build_optimizer(config.optim)
    config = tiny_config(2)
    config.optim.schedule, config.optim.decay_steps = "inverse_sqrt", 1000
    build_optimizer(config.optim)  # EDM2's schedule is accepted
