"""``train_and_evaluate(config, workdir)``: the diffusion training loop.

The config is read here, at the edge; everything below takes explicit arguments. The loop
resumes automatically from the newest readable checkpoint in ``workdir/checkpoints``
(params, EMA, optimizer and data-iterator state), so a restarted job continues the same
step count and the same data order.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxdiff.parallel import global_batch, is_main_process
from jaxdiff.training.checkpoint import Checkpointer
from jaxdiff.training.experiment import Experiment, build_experiment, init_state, run_metadata
from jaxdiff.training.step import jit_train_step, make_train_step
from jaxdiff.training.writers import create_default_writer, progress
from jaxdiff.utils.images import save_image_grid

log = logging.getLogger(__name__)

RUN_KEY = "_run"
"""Key of the run metadata (classes, sample shape) stored in the checkpoint's config."""


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


def _check_finite(metrics: dict[str, float], step: int, ckpt: Checkpointer) -> None:
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
        ckpt.wait_until_finished()
        raise FloatingPointError(
            f"non-finite metrics at step {step}: {metrics}. Training stopped without saving; "
            f"the last good checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is "
            "intact. Lower the learning rate or tighten gradient clipping, then rerun to resume."
        )


def _mean_metrics(window: list[dict[str, jax.Array]]) -> dict[str, float]:
    stacked = jax.device_get(window)
    return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def maybe_write_samples(exp: Experiment, state: Any, step: int, workdir: Path) -> None:
    """Writes a grid of EMA samples to ``workdir/samples/step_XXXXXX.png`` on process 0."""
    images = np.asarray(jax.device_get(exp.sample_grid(state)))
    if is_main_process():
        path = workdir / "samples" / f"step_{step:06d}.png"
        save_image_grid(path, images, scale=exp.grid_scale)
        log.info("wrote samples to %s", path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> Any:
    """Trains a diffusion model as ``config`` says, checkpointing and sampling in ``workdir``.

    Args:
        config: an experiment config (see ``train/configs/digits.py``).
        workdir: where checkpoints, metrics and sample grids go; reused to resume.

    Returns:
        The final :class:`~jaxdiff.training.state.TrainState`.

    Raises:
        ValueError: for a bad config value (the message names it and the fix).
        FloatingPointError: if the loss becomes non-finite.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    exp = build_experiment(config)
    tc = config.train
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=tc.keep_checkpoints)
    state, start = init_state(exp, ckpt)
    writer = create_default_writer(workdir, just_logging=not is_main_process())
    if start == 0:
        writer.write_hparams(config.to_dict())
    step_fn = jit_train_step(
        make_train_step(
            exp.model,
            exp.formulation,
            exp.tx,
            num_classes=exp.num_classes,
            label_dropout=tc.label_dropout,
            ema_warmup=tc.ema_warmup,
        ),
        exp.state_shardings,
        exp.mesh,
    )
    key = jax.random.key(config.seed)
    # One process: catch SIGTERM ourselves. Several: a local flag could make processes stop
    # at different steps, so only orbax's synchronised preemption notice is used.
    stop = StopSignal(signals=(signal.SIGTERM,) if jax.process_count() == 1 else ())
    try:
        state = _run_steps(config, exp, state, start, step_fn, key, ckpt, writer, workdir, stop)
    finally:
        stop.restore()
        ckpt.wait_until_finished()
        writer.flush()
        writer.close()
    return state


def _run_steps(config, exp, state, start, step_fn, key, ckpt, writer, workdir, stop):
    """The step loop of :func:`train_and_evaluate`; returns the last state."""
    tc = config.train
    saved_config = {**config.to_dict(), RUN_KEY: run_metadata(exp)}
    bar = progress(tc.num_steps, start)
    window: list[dict[str, jax.Array]] = []
    t_last, step_last = time.perf_counter(), start
    for step in range(start + 1, tc.num_steps + 1):
        batch = global_batch(exp.to_model_batch(next(exp.data)), exp.mesh)
        state, metrics = step_fn(state, batch, key)
        window.append(metrics)
        is_last = step == tc.num_steps
        if step % tc.log_every == 0 or is_last or step % tc.checkpoint_every == 0:
            scalars = _mean_metrics(window)
            _check_finite(scalars, step, ckpt)
            window.clear()
            dt = time.perf_counter() - t_last
            scalars["steps_per_s"] = (step - step_last) / dt
            scalars["images_per_s"] = scalars["steps_per_s"] * tc.batch_size
            t_last, step_last = time.perf_counter(), step
            writer.write_scalars(step, scalars)
            bar.update(step, loss=scalars["loss"])
        if exp.evaluate is not None and (step % config.eval.every == 0 or is_last):
            scores = exp.evaluate(state)
            writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
        wants_grid = is_last or (tc.sample_every and step % tc.sample_every == 0)
        if wants_grid and config.sample.grid_size > 0:
            maybe_write_samples(exp, state, step, workdir)
        preempted = stop.received is not None or ckpt.reached_preemption(step)
        if step % tc.checkpoint_every == 0 or is_last or preempted:
            if preempted:  # metrics since the last log step were not checked yet
                _check_finite(_mean_metrics(window) if window else {}, step, ckpt)
            ckpt.save(step, state, data_state=exp.data.get_state(), config=saved_config)
        if preempted:
            log.warning("stopping at step %d on a preemption signal; rerun to resume", step)
            break
    bar.close()
    return state


__all__ = ["maybe_write_samples", "train_and_evaluate"]
