"""``distill_and_evaluate(config, workdir)``: distils a trained run into a few-step student.

The teacher is a training workdir (``config.teacher``) restored with
:func:`jaxdiff.experiment.load_run` onto the run's mesh; its data set supplies the "real"
images of the discriminator. The loop is the training loop
(:func:`jaxdiff.training.run_loop`): the same logging, checkpoints, preemption handling
and NaN stop.

``workdir`` gets two checkpoint directories:

* ``checkpoints/``: the *student* as an ordinary run, a TrainState of the generator
  (params, EMA, optax state) with the teacher's model config, the generator's optimizer
  config, its sampling recipe in ``config.sample`` (``solver = "renoise"`` at its trained
  levels ``sigmas``: ``x0 = G(x, sigma_k)``, re-noised between steps, as it was trained)
  and the run metadata, so ``load_run`` and ``python -m sample --workdir=STUDENT``
  sample it as trained;
* ``distill_state/``: the whole :class:`~jaxdiff.distill.fdistill.DistillState` and the
  data iterator, from which a restarted job resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxdiff.distill.fdistill import (
    R1_PERTURBS,
    SCHEDULES,
    FDistillConfig,
    distill_state_shardings,
    generator_updates_before,
    init_distill_state,
    iteration_updates,
    jit_steps,
    make_steps,
)
from jaxdiff.distill.few_step import active_steps, few_step_sample, student_sigmas
from jaxdiff.distill.heads import HEAD_FORMS
from jaxdiff.distill.nets import make_unet_nets
from jaxdiff.distill.ratio import TIME_BIN_COORDINATES
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.builders import (
    RUN_KEY,
    build_data,
    build_mesh,
    build_optimizer,
    check_loop_config,
    check_resume,
    lock_workdir,
    run_metadata,
)
from jaxdiff.experiment.runs import load_run
from jaxdiff.experiment.sampling import student_sample_recipe
from jaxdiff.parallel import is_main_process, prefetch_to_mesh
from jaxdiff.training.checkpoint import Checkpointer
from jaxdiff.training.loop import Hook, run_loop
from jaxdiff.training.state import abstract_state
from jaxdiff.training.writers import create_default_writer
from jaxdiff.utils import storage
from jaxdiff.utils.compile_cache import enable_compile_cache
from jaxdiff.utils.images import save_image_grid
from jaxdiff.utils.rng import per_sample_keys, start_noise

log = logging.getLogger(__name__)


def _check_distill_choices(d: ml_collections.ConfigDict) -> None:
    for key, allowed in (
        ("schedule", SCHEDULES),
        ("r1_perturb", R1_PERTURBS),
        ("time_bin_coordinate", TIME_BIN_COORDINATES),
        ("head_form", HEAD_FORMS),
    ):
        if d[key] not in allowed:
            raise InvalidArgumentError(
                f"config.distill.{key}={d[key]!r} is not one of {allowed}: pass "
                f"--config.distill.{key}={allowed[0]} (or another of them)"
            )
    least = 1 if d.schedule == "dmd2" else 0
    if d.critic_steps < least:
        raise InvalidArgumentError(
            f"config.distill.critic_steps={d.critic_steps} must be >= {least} with "
            f"schedule={d.schedule!r}: pass --config.distill.critic_steps=4"
        )


def fdistill_config(config: ml_collections.ConfigDict, teacher_sample: Any) -> FDistillConfig:
    """The :class:`FDistillConfig` of ``config.distill`` on the teacher's sigma range.

    Raises:
        InvalidArgumentError: for an unknown schedule, R1 form, bin coordinate or head form.
    """
    d = config.distill
    _check_distill_choices(d)
    sigmas = student_sigmas(
        d.student_steps, teacher_sample.sigma_min, teacher_sample.sigma_max, teacher_sample.rho
    )
    return FDistillConfig(
        divergence=d.divergence,
        gan_weight=d.gan_weight,
        disc_weight=d.disc_weight,
        gan_loss=d.gan_loss,
        r1_weight=d.r1_weight,
        r1_noise=d.r1_noise,
        r1_perturb=d.r1_perturb,
        num_time_bins=d.num_time_bins,
        bin_ema=d.bin_ema,
        time_bin_coordinate=d.time_bin_coordinate,
        sigma_min=teacher_sample.sigma_min,
        sigma_max=teacher_sample.sigma_max,
        rho=teacher_sample.rho,
        gen_t_range=tuple(d.gen_t_range),
        fake_t_range=tuple(d.fake_t_range),
        disc_t_range=tuple(d.disc_t_range),
        student_sigmas=tuple(float(s) for s in sigmas),
        extractor=d.extractor,
        head_form=d.head_form,
        num_heads=d.num_heads,
        head_kinds=tuple(d.head_kinds),
        num_groups=d.num_groups,
        heads_per_step=d.heads_per_step,
        refresh_fraction=d.refresh_fraction,
    )


def student_config(config: ml_collections.ConfigDict, teacher_config: Any, meta: dict) -> dict:
    """The config stored beside the student's checkpoints (what ``load_run`` reads).

    Its ``sample`` section is the student's recipe
    (:func:`jaxdiff.experiment.sampling.student_sample_recipe`): ``solver = "renoise"``,
    ``steps = K`` and ``sigmas``, the K levels it was trained at.
    """
    out = teacher_config.to_dict()
    out["optim"] = config.optim.to_dict()
    # The student keeps only constant-rate EMAs: a teacher's power-EMA profiles
    # (ema_stds) are not tracked by distillation, so load_run must not look for them.
    out["train"] = {**out["train"], "ema_rates": tuple(config.train.ema_rates), "ema_stds": ()}
    # Its own sampling recipe: the levels it was trained at (fdistill_config's, from the
    # teacher's sigma range) and the re-noising solver, so sampling needs no flags.
    ts = teacher_config.sample
    levels = student_sigmas(int(config.distill.student_steps), ts.sigma_min, ts.sigma_max, ts.rho)
    out["sample"] = {**out["sample"], **student_sample_recipe(levels)}
    out["distill_config"] = config.to_dict()
    out[RUN_KEY] = meta
    return out


def _grid_hook(config, teacher, nets, cfg, workdir: str) -> Hook | None:
    num = int(config.sample.grid_size)
    if num <= 0:
        return None
    # Sample j's start noise and re-noising come from fold_in(key(seed + 1), j), the
    # seeding of `python -m sample --seed=SEED+1`, so the grid does not depend on its size.
    keys = per_sample_keys(jax.random.key(config.seed + 1), num)
    noise = start_noise(keys, teacher.sample_shape)
    labels = (np.arange(num) % teacher.num_classes) if teacher.num_classes else None

    def gen(p, x, sigma, c):
        return nets.student(p, x, sigma, c)[0]

    sample = jax.jit(lambda p, z, c, k: few_step_sample(gen, p, z, c, cfg.student_sigmas, k))

    def write(step: int, state: Any) -> None:
        del step
        params = state.gen.ema[next(iter(state.gen.ema))] if state.gen.ema else state.gen.params
        images = np.asarray(sample(params, noise, labels, keys))
        if is_main_process():
            path = storage.join(workdir, "samples", "student.png")
            save_image_grid(path, images, scale=int(config.sample.grid_scale))
            log.info("wrote student samples to %s", path)

    return Hook("student samples", 0, write)


def distill_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Any:
    """Distils ``config.teacher`` into a student in ``workdir`` (resumes if it can).

    Args:
        config: a distillation config (``method = "distill"``).
        workdir: where the student checkpoints, metrics and grids go.

    Returns:
        The final :class:`~jaxdiff.distill.fdistill.DistillState`.

    Raises:
        InvalidArgumentError: for a missing teacher or bad values (the message names the fix).
        FloatingPointError: if a loss becomes non-finite (the last checkpoint is intact).
    """
    if not config.get("teacher"):
        raise InvalidArgumentError(
            "no teacher: pass --config.teacher=WORKDIR, the workdir of a trained run "
            "(e.g. `python -m train --workdir=runs/digits` first)"
        )
    check_loop_config(config)
    enable_compile_cache(config.get("compile_cache_dir"))
    tc, d = config.train, config.distill
    mesh = build_mesh(config)
    ema = None if config.teacher_ema == "none" else config.teacher_ema
    teacher = load_run(config.teacher, ema=ema, mesh=mesh)
    _, data, _ = build_data(config, teacher.config.data)
    cfg = fdistill_config(config, teacher.config.sample)
    nets = make_unet_nets(
        teacher.model,
        teacher.formulation,
        cfg,
        num_classes=teacher.num_classes,
        sample_shape=teacher.sample_shape,
        teacher_params_example=teacher.params,
        feature_names=tuple(d.feature_names),
        head_width=d.head_width,
        teacher_guidance=d.teacher_guidance,
    )
    txs = (
        build_optimizer(config.optim),
        build_optimizer(config.critic_optim, key="critic_optim"),
        build_optimizer(config.critic_optim, key="critic_optim"),
    )
    p_shard, teacher_params = teacher.param_shardings, teacher.params

    def init_fn(key):
        return init_distill_state(
            teacher_params, teacher_params, nets.init_pool(key), txs, cfg, tuple(tc.ema_rates)
        )

    shardings = distill_state_shardings(
        jax.eval_shape(init_fn, jax.random.key(0)), p_shard, txs, mesh
    )
    workdir = storage.to_str(workdir)
    hooks = [_grid_hook(config, teacher, nets, cfg, workdir)]
    gen_step, critic_step = jit_steps(make_steps(nets, cfg, txs), shardings, p_shard, mesh)
    saved = student_config(
        config, teacher.config, run_metadata(teacher.num_classes, teacher.sample_shape)
    )
    key = jax.random.key(config.seed)

    def model_batch(raw):
        local = {"image": raw["image"]}
        if teacher.num_classes > 0:
            local["label"] = raw["label"]
        return local

    batches = None  # device prefetcher, made once the data position is restored

    def step_fn(state, step):
        # One loop step is one iteration of the schedule: a generator or a critic update
        # ("alternate"), or under "dmd2" a critic update, after a generator update every
        # critic_steps iterations (both on this iteration's batch).
        batch = next(batches)
        gen_updates = generator_updates_before(step - 1, d.critic_steps, d.schedule)
        num_active = active_steps(gen_updates, d.refine_stage_steps, d.student_steps)
        metrics = {}
        for which in iteration_updates(step - 1, d.critic_steps, d.schedule):
            update = gen_step if which == "generator" else critic_step
            state, m = update(state, teacher_params, batch, key, num_active)
            metrics.update(m)
        return state, metrics

    with contextlib.ExitStack() as stack:
        stack.enter_context(lock_workdir(workdir))
        keep = tc.keep_checkpoints
        full_ckpt, student_ckpt = (
            stack.enter_context(
                Checkpointer(storage.join(workdir, name), max_to_keep=keep, quarantine=True)
            )
            for name in ("distill_state", "checkpoints")
        )
        state, start = _init_or_restore(full_ckpt, init_fn, shardings, data, config.seed)
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
            full_ckpt.save(step, state, data_state=batches.get_state(), config=saved)
            student_ckpt.save(step, state.gen, config=saved)

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
            progress_metric="gen_loss",
        )


def _init_or_restore(ckpt: Checkpointer, init_fn, shardings, data, seed: int):
    """The whole DistillState from ``ckpt`` (and the data position), or a fresh one."""
    if ckpt.latest_step() is None:
        return jax.jit(init_fn, out_shardings=shardings)(jax.random.key(seed + 7)), 0
    state, data_state, start = ckpt.restore(abstract_state(init_fn, shardings))
    if data_state is not None:
        data.set_state(data_state)
    log.info("resumed distillation from %s in %s", ckpt.last_restore.describe(), ckpt.directory)
    return state, start


__all__ = ["distill_and_evaluate", "fdistill_config", "student_config"]
