"""The one loop driver shared by training and distillation: :func:`run_loop`.

It owns what every long run needs and nothing about the model: metric logging and the
progress bar, periodic checkpoints, preemption (SIGTERM or orbax's multi-host notice), a
non-finite-metrics stop that first waits for the last save to land, and hooks (sample
grids, evaluation) that run *after* a step's checkpoint, so an optional hook that fails
never costs a checkpoint. The step itself is a callable, so a diffusion train step and
f-distill's alternating critic/generator updates run through the same code.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxdiff.training.checkpoint import Checkpointer
from jaxdiff.training.writers import MetricWriter, progress

log = logging.getLogger(__name__)

StepFn = Callable[[Any, int], tuple[Any, dict[str, jax.Array]]]
"""``step_fn(state, step) -> (state, metrics)``: one update, ``step`` counting from 1."""


class StopSignal:
    """Records SIGTERM/SIGINT so the loop can checkpoint and exit cleanly.

    Installed only in the main thread (Python's rule for signal handlers); the previous
    handlers come back on :meth:`restore`.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        del frame
        self.received = signum

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass(frozen=True)
class Hook:
    """Work the loop does every ``every`` steps and at the last step, after checkpointing.

    Attributes:
        name: for log messages.
        every: period in steps; 0 = only at the last step.
        fn: ``fn(step, state) -> scalars or None``; returned scalars are written at ``step``.
    """

    name: str
    every: int
    fn: Callable[[int, Any], dict[str, float] | None]

    def due(self, step: int, is_last: bool) -> bool:
        """Whether the hook runs at ``step``."""
        return is_last or (self.every > 0 and step % self.every == 0)


def mean_metrics(window: Sequence[dict[str, jax.Array]]) -> dict[str, float]:
    """Per-key means over a window of step metrics (a key may be missing from some steps)."""
    stacked = jax.device_get(list(window))
    keys = sorted({k for m in stacked for k in m})
    return {k: float(np.mean([m[k] for m in stacked if k in m])) for k in keys}


def _check_finite(scalars: dict[str, float], step: int, ckpts: Sequence[Checkpointer]) -> None:
    bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
    if not bad:
        return
    # Let in-flight saves land first, so the step named below really is on disk.
    for ckpt in ckpts:
        ckpt.wait_until_finished()
    last = ckpts[0].latest_step() if ckpts else None
    where = ckpts[0].directory if ckpts else "-"
    info = ckpts[0].last_restore if ckpts else None
    origin = f"This run resumed from {info.describe()}. " if info is not None else ""
    raise FloatingPointError(
        f"non-finite metrics at step {step}: {bad}. The run stopped without saving; the "
        f"last good checkpoint (step {last}) in {where} is intact. {origin}Lower the "
        "learning rate or tighten gradient clipping, then rerun to resume."
    )


def run_loop(
    state: Any,
    step_fn: StepFn,
    *,
    start: int,
    num_steps: int,
    log_every: int,
    checkpoint_every: int,
    save: Callable[[int, Any], None],
    checkpointers: Sequence[Checkpointer],
    writer: MetricWriter,
    hooks: Sequence[Hook] = (),
    examples_per_step: int | None = None,
    progress_metric: str = "loss",
) -> Any:
    """Runs steps ``start + 1 .. num_steps``; returns the last state.

    At each step, in order: the update; every ``log_every`` steps (and at checkpoint and
    last steps) the mean metrics of the window are checked for NaN/inf and written; every
    ``checkpoint_every`` steps, at the last step and on preemption ``save(step, state)``;
    then the due hooks. On SIGTERM (one process) or orbax's preemption notice (several)
    the loop saves and returns early.

    Args:
        state: the initial (or restored) state.
        step_fn: one update, ``(state, step) -> (state, metrics)``.
        start: the step ``state`` is at (0 for a fresh run).
        num_steps: the step to stop at.
        log_every: logging period.
        checkpoint_every: checkpoint period.
        save: writes the checkpoint(s) of a step (asynchronously is fine).
        checkpointers: those ``save`` writes to; the first names the run's checkpoints in
            messages and supplies the multi-host preemption notice.
        writer: metric writer.
        hooks: periodic extra work (grids, evaluation).
        examples_per_step: global batch size, for the ``images_per_s`` metric.
        progress_metric: metric shown by the progress bar.

    Raises:
        FloatingPointError: on non-finite metrics, after pending saves have landed.
    """
    # One process: catch SIGTERM ourselves. Several: a local flag could make processes stop
    # at different steps, so only orbax's synchronised preemption notice is used.
    stop = StopSignal(signals=(signal.SIGTERM,) if jax.process_count() == 1 else ())
    bar = progress(num_steps, start)
    window: list[dict[str, jax.Array]] = []
    t_last, step_last = time.perf_counter(), start
    try:
        for step in range(start + 1, num_steps + 1):
            state, metrics = step_fn(state, step)
            window.append(metrics)
            is_last = step == num_steps
            preempted = stop.received is not None or (
                bool(checkpointers) and checkpointers[0].reached_preemption(step)
            )
            wants_save = step % checkpoint_every == 0 or is_last or preempted
            if window and (step % log_every == 0 or wants_save):
                scalars = mean_metrics(window)
                window.clear()
                _check_finite(scalars, step, checkpointers)
                dt = time.perf_counter() - t_last
                scalars["steps_per_s"] = (step - step_last) / dt
                if examples_per_step:
                    scalars["images_per_s"] = scalars["steps_per_s"] * examples_per_step
                t_last, step_last = time.perf_counter(), step
                writer.write_scalars(step, scalars)
                bar.update(step, loss=scalars.get(progress_metric, float("nan")))
            if wants_save:
                save(step, state)
                writer.flush()  # metrics reach a bucket at least as often as checkpoints
            if preempted:
                log.warning("stopping at step %d on a preemption signal; rerun to resume", step)
                break
            for hook in hooks:
                if hook.due(step, is_last):
                    scores = hook.fn(step, state)
                    if scores:
                        writer.write_scalars(step, scores)
    finally:
        bar.close()
        stop.restore()
        for ckpt in checkpointers:
            ckpt.wait_until_finished()
    return state


__all__ = ["Hook", "StepFn", "StopSignal", "mean_metrics", "run_loop"]
