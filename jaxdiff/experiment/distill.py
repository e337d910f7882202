"""``distill_and_evaluate(config, workdir)``: one driver for every few-step method.

``config.method`` picks the method (:data:`DISTILL_METHODS`; ``"distill"`` is f-distill's
old name): f-distill / DMD2 (:mod:`jaxdiff.experiment.distill_fdistill`), consistency
distillation and training, sCM, MeanFlow, progressive and guidance distillation
(:mod:`jaxdiff.experiment.distill_methods`). The teacher is a training workdir
(``config.teacher``) restored with :func:`jaxdiff.experiment.load_run` onto the run's mesh;
its data set supplies the real images. The loop is the training loop
(:func:`jaxdiff.training.run_loop`): the same logging, checkpoints, preemption handling and
NaN stop, for every method.

``workdir`` gets two checkpoint directories:

* ``checkpoints/``: the *student* as an ordinary run, a TrainState (params, EMA, optax
  state) with its config, whose ``sample`` section is the student's own sampling recipe,
  so ``load_run`` and ``python -m sample --workdir=STUDENT`` sample it as trained;
* ``distill_state/``: the method's whole state and the data iterator, from which a
  restarted job resumes exactly.

A method's default budget is ``config.<section>.num_steps`` (used when
``config.train.num_steps`` is None), sized to about 10 minutes on a 2-core CPU for the
digits teacher.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.builders import (
    RUN_KEY,
    build_data,
    build_formulation,
    build_mesh,
    check_loop_config,
    check_resume,
    lock_workdir,
    run_metadata,
)
from jaxdiff.experiment.distill_common import DistillContext, Method
from jaxdiff.experiment.distill_fdistill import build_fdistill, fdistill_config, student_config
from jaxdiff.experiment.distill_methods import BUILDERS
from jaxdiff.experiment.generation import generate_samples
from jaxdiff.experiment.runs import TrainedModel, load_run
from jaxdiff.experiment.sampling import resolve_sampler
from jaxdiff.parallel import is_main_process, prefetch_to_mesh
from jaxdiff.training.checkpoint import Checkpointer
from jaxdiff.training.loop import Hook, run_loop
from jaxdiff.training.state import abstract_state
from jaxdiff.training.writers import create_default_writer
from jaxdiff.utils import storage
from jaxdiff.utils.compile_cache import enable_compile_cache
from jaxdiff.utils.images import save_image_grid

log = logging.getLogger(__name__)

DISTILL_METHODS = (
    "fdistill",
    "cd",
    "ct",
    "scm",
    "meanflow",
    "progressive",
    "guidance_distill",
)
"""The ``config.method`` names of the distillation driver."""
ALIASES = {"distill": "fdistill"}
"""Old names: ``"distill"`` is f-distill."""
SECTIONS = {"fdistill": "distill"}
"""Config section of a method whose section is not its name."""


def resolve_method(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with its method's canonical name, budget and learning rate.

    ``config.<section>.num_steps`` is the budget when ``config.train.num_steps`` is None;
    ``config.<section>.learning_rate``, when set, replaces ``config.optim.learning_rate``.

    Raises:
        InvalidArgumentError: for an unknown method, a missing section, or no budget.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    name = ALIASES.get(config.get("method"), config.get("method"))
    if name not in DISTILL_METHODS:
        raise InvalidArgumentError(
            f"config.method={config.get('method')!r} is not a distillation method: choose one "
            f"of {', '.join(DISTILL_METHODS)}"
        )
    section = SECTIONS.get(name, name)
    if section not in config:
        raise InvalidArgumentError(
            f"config.method={name!r} needs the config section config.{section} (its knobs): "
            "start from train/configs/distill_digits.py, which has one for every method"
        )
    config.method = name
    rate = config[section].get("learning_rate")
    if rate is not None:  # the method's own learning rate, stored as the student's optim
        config.optim.learning_rate = float(rate)
    if config.train.get("num_steps") is None:
        budget = config[section].get("num_steps")
        if budget is None:
            raise InvalidArgumentError(
                f"no budget: set --config.train.num_steps=N or config.{section}.num_steps"
            )
        config.train.num_steps = int(budget)
    return config


def build_method(ctx: DistillContext) -> Method:
    """The :class:`Method` of ``ctx.config.method`` (resolved by :func:`resolve_method`)."""
    name = ctx.config.method
    return build_fdistill(ctx) if name == "fdistill" else BUILDERS[name](ctx)


def student_view(method: Method, ctx: DistillContext, params: Any) -> TrainedModel:
    """The student as ``load_run`` will restore it (its stored config), with ``params``."""
    stored = dict(method.saved)
    stored.pop(RUN_KEY, None)
    config = ml_collections.ConfigDict(stored)
    return TrainedModel(
        config=config,
        model=method.student_model,
        formulation=build_formulation(config),
        params=params,
        num_classes=ctx.teacher.num_classes,
        sample_shape=ctx.teacher.sample_shape,
        step=0,
        mesh=ctx.mesh,
        param_shardings=method.student_shardings,
    )


def _grid_hook(method: Method, ctx: DistillContext, workdir: str) -> Hook | None:
    """Writes ``samples/student.png`` at the end, sampled with the student's stored recipe."""
    config = ctx.config
    num = int(config.sample.grid_size)
    if num <= 0:
        return None
    classes = ctx.teacher.num_classes
    labels = (np.arange(num) % classes).astype(np.int32) if classes else np.zeros(num, np.int32)

    def write(step: int, state: Any) -> None:
        del step
        gen = state.gen
        params = gen.ema[next(iter(gen.ema))] if gen.ema else gen.params
        run = student_view(method, ctx, params)
        spec = resolve_sampler(run.config.sample, num_classes=classes)
        # Seeded as `python -m sample --seed=SEED+1`: the grid does not depend on its size.
        images, _ = generate_samples(run, spec, num=num, labels=labels, seed=config.seed + 1)
        if is_main_process():
            path = storage.join(workdir, "samples", "student.png")
            save_image_grid(path, images, scale=int(config.sample.grid_scale))
            log.info("wrote student samples (%s) to %s", spec.describe(), path)

    return Hook("student samples", 0, write)


def distill_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Any:
    """Distils ``config.teacher`` into a student in ``workdir`` (resumes if it can).

    Args:
        config: a distillation config (``method`` one of :data:`DISTILL_METHODS`).
        workdir: where the student checkpoints, metrics and grids go.

    Returns:
        The method's final state.

    Raises:
        InvalidArgumentError: for a missing teacher or bad values (the message names the fix).
        FloatingPointError: if a loss becomes non-finite (the last checkpoint is intact).
    """
    if not config.get("teacher"):
        raise InvalidArgumentError(
            "no teacher: pass --config.teacher=WORKDIR, the workdir of a trained run "
            "(e.g. `python -m train --workdir=runs/digits` first)"
        )
    config = resolve_method(config)
    check_loop_config(config)
    enable_compile_cache(config.get("compile_cache_dir"))
    tc = config.train
    mesh = build_mesh(config)
    ema = None if config.teacher_ema == "none" else config.teacher_ema
    teacher = load_run(config.teacher, ema=ema, mesh=mesh)
    _, data, _ = build_data(config, teacher.config.data)
    ctx = DistillContext(
        config, teacher, mesh, run_metadata(teacher.num_classes, teacher.sample_shape)
    )
    method = build_method(ctx)
    workdir = storage.to_str(workdir)
    hooks = [_grid_hook(method, ctx, workdir)]

    def model_batch(raw):
        local = {"image": raw["image"]}
        if teacher.num_classes > 0:
            local["label"] = raw["label"]
        return local

    batches = None  # device prefetcher, made once the data position is restored

    def step_fn(state, step):
        return method.step(state, next(batches), step - 1)

    with contextlib.ExitStack() as stack:
        stack.enter_context(lock_workdir(workdir))
        keep = tc.keep_checkpoints
        full_ckpt, student_ckpt = (
            stack.enter_context(
                Checkpointer(storage.join(workdir, name), max_to_keep=keep, quarantine=True)
            )
            for name in ("distill_state", "checkpoints")
        )
        state, start = _init_or_restore(full_ckpt, method, teacher.params, data, config.seed)
        for ckpt in (full_ckpt, student_ckpt):
            check_resume(ckpt, start, tc.num_steps)
        writer = create_default_writer(workdir, just_logging=not is_main_process())
        stack.callback(writer.close)
        stack.callback(writer.flush)
        stack.callback(data.close)  # stops input worker processes at once
        # Two global batches wait on the devices; checkpoints record the next unused one.
        batches = prefetch_to_mesh(data, mesh, size=2, transform=model_batch)
        batches.start_prefetch()  # input workers start up while the steps compile
        if start == 0:
            writer.write_hparams(config.to_dict())

        def save(step, state):
            full_ckpt.save(step, state, data_state=batches.get_state(), config=method.saved)
            student_ckpt.save(step, state.gen, config=method.saved)

        return run_loop(
            state,
            step_fn,
            start=start,
            num_steps=tc.num_steps,
            log_every=tc.log_every,
            checkpoint_every=tc.checkpoint_every,
            save=save,
            checkpointers=[student_ckpt, full_ckpt],
            writer=writer,
            hooks=[h for h in hooks if h is not None],
            examples_per_step=tc.batch_size,
            progress_metric=method.progress_metric,
        )


def _init_or_restore(ckpt: Checkpointer, method: Method, teacher_params: Any, data, seed: int):
    """The method's whole state from ``ckpt`` (and the data position), or a fresh one."""
    if ckpt.latest_step() is None:
        init = jax.jit(method.init, out_shardings=method.shardings)
        return init(jax.random.key(seed + 7), teacher_params), 0
    shapes = abstract_state(lambda key: method.init(key, teacher_params), method.shardings)
    state, data_state, start = ckpt.restore(shapes)
    if data_state is not None:
        data.set_state(data_state)
    log.info("resumed distillation from %s in %s", ckpt.last_restore.describe(), ckpt.directory)
    return state, start


__all__ = [
    "ALIASES",
    "DISTILL_METHODS",
    "build_method",
    "distill_and_evaluate",
    "fdistill_config",
    "resolve_method",
    "student_config",
    "student_view",
]
