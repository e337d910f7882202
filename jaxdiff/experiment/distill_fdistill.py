"""f-distill (DMD2 for ``rkl``) as a method of the distillation driver.

The generator, fake score and discriminator pool step on a schedule that lives outside
the jitted steps (:func:`jaxdiff.distill.fdistill.iteration_updates`): under
``"alternate"`` each loop iteration is a generator or a critic update; under ``"dmd2"``
the critic steps every iteration and the generator every ``critic_steps``-th.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

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
from jaxdiff.distill.few_step import active_steps, student_sigmas
from jaxdiff.distill.heads import HEAD_FORMS
from jaxdiff.distill.nets import make_unet_nets
from jaxdiff.distill.ratio import TIME_BIN_COORDINATES
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.builders import build_optimizer
from jaxdiff.experiment.distill_common import DistillContext, Method, stored_config
from jaxdiff.experiment.sampling import student_sample_recipe


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
    """The config stored beside an f-distill student's checkpoints (what ``load_run`` reads).

    Its ``sample`` section is the student's recipe
    (:func:`jaxdiff.experiment.sampling.student_sample_recipe`): ``solver = "renoise"``,
    ``steps = K`` and ``sigmas``, the K levels it was trained at.
    """
    ts = teacher_config.sample
    levels = student_sigmas(int(config.distill.student_steps), ts.sigma_min, ts.sigma_max, ts.rho)
    return stored_config(config, teacher_config, meta, sample=student_sample_recipe(levels))


def build_fdistill(ctx: DistillContext) -> Method:
    """f-distill's :class:`Method`: generator + critic steps on the configured schedule."""
    config, teacher, mesh = ctx.config, ctx.teacher, ctx.mesh
    d = config.distill
    cfg = fdistill_config(config, teacher.config.sample)
    try:
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
    except InvalidArgumentError as err:  # a teacher with fewer levels than the default
        raise InvalidArgumentError(
            f"--config.distill.feature_names={tuple(d.feature_names)} does not fit the "
            f"teacher: {err}"
        ) from None
    txs = (
        build_optimizer(config.optim),
        build_optimizer(config.critic_optim, key="critic_optim"),
        build_optimizer(config.critic_optim, key="critic_optim"),
    )
    p_shard, teacher_params = teacher.param_shardings, teacher.params

    def init(key, params):
        pool = nets.init_pool(key)
        rates = tuple(config.train.ema_rates)
        return init_distill_state(params, params, pool, txs, cfg, rates)

    abstract = jax.eval_shape(init, jax.random.key(0), teacher_params)
    shardings = distill_state_shardings(abstract, p_shard, txs, mesh)
    gen_step, critic_step = jit_steps(make_steps(nets, cfg, txs), shardings, p_shard, mesh)
    key = ctx.key

    def step(state, batch, iteration):
        # One loop iteration of the schedule: a generator or a critic update
        # ("alternate"), or under "dmd2" a critic update, after a generator update every
        # critic_steps iterations (both on this iteration's batch).
        gen_updates = generator_updates_before(iteration, d.critic_steps, d.schedule)
        num_active = active_steps(gen_updates, d.refine_stage_steps, d.student_steps)
        metrics = {}
        for which in iteration_updates(iteration, d.critic_steps, d.schedule):
            update = gen_step if which == "generator" else critic_step
            state, m = update(state, teacher_params, batch, key, num_active)
            metrics.update(m)
        return state, metrics

    saved = student_config(config, teacher.config, ctx.meta)
    return Method(init, shardings, step, saved, teacher.model, p_shard, "gen_loss")


__all__ = ["build_fdistill", "fdistill_config", "student_config"]
