"""The one loop driver (training and distillation both run through it), on a toy state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.parallel import make_mesh, replicated
from jaxdiff.training import Checkpointer, Hook, mean_metrics, run_loop
from jaxdiff.training.writers import JsonlWriter


def _state():
    rep = replicated(make_mesh(num_devices=1))
    return {"w": jax.device_put(jnp.zeros(3), rep), "step": jax.device_put(jnp.int32(0), rep)}


def _step_fn(nan_at=None):
    def step_fn(state, step):
        loss = jnp.float32(np.nan if step == nan_at else 1.0 / step)
        return {"w": state["w"] + 1.0, "step": state["step"] + 1}, {"loss": loss}

    return step_fn


def _run(tmp_path, step_fn, num_steps, hooks=(), start=0, state=None):
    ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=5)
    writer = JsonlWriter(str(tmp_path / "metrics.jsonl"))
    try:
        return run_loop(
            _state() if state is None else state,
            step_fn,
            start=start,
            num_steps=num_steps,
            log_every=3,
            checkpoint_every=2,
            save=lambda step, state: ckpt.save(step, state),
            checkpointers=[ckpt],
            writer=writer,
            hooks=hooks,
        )
    finally:
        ckpt.close()
        writer.close()


def test_nan_stops_after_the_last_save_landed_and_names_it(tmp_path):
    # Step 4 is saved asynchronously; step 5 goes NaN and is checked at step 6, which is
    # also a checkpoint step. The check must come before step 6 is saved and after the save
    # of step 4 finished; it names step 4 and leaves every saved step intact.
    with pytest.raises(FloatingPointError, match=r"step 6.*last good checkpoint \(step 4\)"):
        _run(tmp_path, _step_fn(nan_at=5), num_steps=8)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [2, 4]
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), _state()
    )
    restored, _, step = ckpt.restore(target)
    assert step == 4 and np.all(np.asarray(restored["w"]) == 4.0)


def test_hooks_run_after_the_checkpoint_of_their_step(tmp_path):
    seen = []

    def fail_at_4(step, state):
        seen.append(step)
        if step == 4:
            raise RuntimeError("grid failed")
        return {"hook/value": float(step)}

    with pytest.raises(RuntimeError, match="grid failed"):
        _run(tmp_path, _step_fn(), num_steps=6, hooks=[Hook("grid", 2, fail_at_4)])
    assert seen == [2, 4]
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2, 4]  # saved first
    lines = (tmp_path / "metrics.jsonl").read_text()
    assert '"hook/value": 2.0' in lines


def test_resume_continues_the_step_count_and_logs(tmp_path):
    state = _run(tmp_path, _step_fn(), num_steps=4)
    state = _run(tmp_path, _step_fn(), num_steps=6, start=4, state=state)
    assert int(state["step"]) == 6
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2, 4, 6]


def test_hook_schedule_and_metric_means():
    every2, last_only = Hook("a", 2, lambda s, x: None), Hook("b", 0, lambda s, x: None)
    assert [s for s in range(1, 7) if every2.due(s, s == 6)] == [2, 4, 6]
    assert [s for s in range(1, 7) if last_only.due(s, s == 6)] == [6]
    means = mean_metrics([{"gen": 1.0, "critic": 3.0}, {"critic": 5.0}])
    assert means == {"gen": 1.0, "critic": 4.0}  # a key missing from some steps is fine
