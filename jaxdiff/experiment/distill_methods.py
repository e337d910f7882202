"""The few-step methods behind ``--config.method=NAME`` of the distillation driver.

Each method is a small, pure step from :mod:`jaxdiff.distill` (one module per method) plus
what the driver needs to run and store it, built here from the config:
:class:`Method` holds the state's initialiser and shardings, the jitted step, the student's
network, and the config stored beside its checkpoints, whose ``sample`` section is the
student's own sampling recipe, so ``python -m sample --workdir=STUDENT`` and ``load_run``
sample it as it was trained:

===================  ==========================================  ============================
``config.method``    student                                      stored recipe
===================  ==========================================  ============================
``fdistill``         f-distill / DMD2 generator                   ``renoise`` at K levels
``cd``               consistency function (Song et al.)           ``renoise:sigma_min=s_1``
``ct``               ECT consistency function (no teacher)        ``renoise``
``scm``              sCM (TrigFlow; EDM teachers)                 ``renoise`` at TrigFlow times
``meanflow``         average velocity with ``aux_time = t - r``   ``meanflow`` jumps
``progressive``      PD student, ``N0 / 2^R`` Euler steps          ``euler`` at its grid
``guidance_distill`` ``w``-conditioned student (``aux_time = w``)  teacher's solver, ``cfg:W``
===================  ==========================================  ============================

Each method's knobs are the config section of its name (f-distill's is ``config.distill``);
``num_steps`` there is its default budget (used when ``config.train.num_steps`` is None),
``sample_levels`` the K levels stored in its recipe and ``sample_steps`` how many of them
``python -m sample`` uses by default.
"""

from __future__ import annotations

import flax.linen as nn
import ml_collections
import numpy as np

from jaxdiff.diffusion.edm import EDM
from jaxdiff.distill.consistency import (
    CDConfig,
    CTConfig,
    init_cd_state,
    init_ct_state,
    make_cd_step,
    make_ct_step,
)
from jaxdiff.distill.few_step import student_sigmas
from jaxdiff.distill.guidance_distill import (
    GuidanceDistillConfig,
    init_guidance_distill_state,
    make_guidance_distill_step,
)
from jaxdiff.distill.meanflow import (
    MeanFlowConfig,
    denoiser_velocity,
    init_meanflow_state,
    make_meanflow_step,
)
from jaxdiff.distill.progressive import (
    ProgressiveConfig,
    init_progressive_state,
    make_progressive_step,
)
from jaxdiff.distill.scm import SCMConfig, init_scm_state, make_scm_step, scm_sample_times
from jaxdiff.distill.trigflow import sigma_from_trig
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.builders import CONSISTENCY_KEY, build_model
from jaxdiff.experiment.distill_common import (
    DistillContext,
    Method,
    method_config,
    net_apply,
    recipe,
    sample_levels,
    simple_method,
)
from jaxdiff.experiment.sampling import GUIDANCE_INPUT, MEANFLOW


def _teacher_range(ctx: DistillContext) -> dict:
    sc = ctx.teacher.config.sample
    return {"sigma_min": float(sc.sigma_min), "sigma_max": float(sc.sigma_max), "rho": sc.rho}


def _sigma_data(ctx: DistillContext) -> float:
    return float(getattr(ctx.teacher.formulation, "sigma_data", 0.5))


def build_cd(ctx: DistillContext) -> Method:
    """Consistency distillation; the recipe's levels are CD levels nearest to Karras'."""
    rng = _teacher_range(ctx)
    cfg = method_config(
        ctx, "cd", CDConfig, sigma_max=rng["sigma_max"], rho=rng["rho"], sigma_data=_sigma_data(ctx)
    )
    grid = cfg.levels()[::-1]  # descending: sigma_max ... sigma_min
    wanted = student_sigmas(sample_levels(ctx, "cd"), cfg.sigma_min, cfg.sigma_max, cfg.rho)
    # The multistep recipe re-noises at trained levels only: the CD level nearest (in log
    # sigma) to each Karras level, never the boundary itself (f(x, sigma_min) = x).
    inner = grid[:-1]
    picked = [int(np.argmin(np.abs(np.log(inner) - np.log(w)))) for w in wanted]
    levels = inner[sorted(set(picked))]
    solver = f"renoise:sigma_min={cfg.sigma_min:g}"
    consistency = {"sigma_min": cfg.sigma_min, "sigma_data": cfg.sigma_data}
    saved = ctx.stored(
        sample=recipe(solver, levels, ctx, "cd"),
        formulation={CONSISTENCY_KEY: consistency},
    )
    apply = net_apply(ctx.teacher.model)
    return simple_method(
        ctx,
        cfg,
        init_state=init_cd_state,
        make_step=make_cd_step,
        saved=saved,
        apply_student=apply,
        apply_teacher=apply,
    )


def build_ct(ctx: DistillContext) -> Method:
    """ECT consistency training, tuned from the teacher's weights (no teacher calls)."""
    rng = _teacher_range(ctx)
    sigma_data = _sigma_data(ctx)
    cfg = method_config(ctx, "ct", CTConfig, sigma_max=rng["sigma_max"], sigma_data=sigma_data)
    floor = max(cfg.sigma_min, rng["sigma_min"])
    levels = student_sigmas(sample_levels(ctx, "ct"), floor, cfg.sigma_max, rng["rho"])
    solver = f"renoise:sigma_min={cfg.sigma_min:g}" if cfg.sigma_min else "renoise"
    consistency = {"sigma_min": cfg.sigma_min, "sigma_data": cfg.sigma_data}
    saved = ctx.stored(
        sample=recipe(solver, levels, ctx, "ct"),
        formulation={CONSISTENCY_KEY: consistency},
    )
    return simple_method(
        ctx,
        cfg,
        init_state=init_ct_state,
        make_step=make_ct_step,
        saved=saved,
        apply_student=net_apply(ctx.teacher.model),
        apply_teacher=None,
    )


def build_scm(ctx: DistillContext) -> Method:
    """sCD/sCT on an EDM teacher: the student is an EDM denoiser (exact TrigFlow form)."""
    form = ctx.teacher.formulation
    if not isinstance(form, EDM):
        raise InvalidArgumentError(
            f"config.method=scm needs an EDM teacher (its network is read in TrigFlow form); "
            f"this teacher's formulation is {type(form).__name__}: use cd or ct instead"
        )
    rng = _teacher_range(ctx)
    cfg = method_config(
        ctx,
        "scm",
        SCMConfig,
        sigma_max=rng["sigma_max"],
        sigma_data=form.sigma_data,
        parameterisation="edm",
    )
    if cfg.parameterisation != "edm":
        raise InvalidArgumentError(
            "config.scm.parameterisation must be 'edm' to start from an EDM teacher's weights"
        )
    times = scm_sample_times(sample_levels(ctx, "scm"), cfg)
    levels = np.asarray(sigma_from_trig(np.asarray(times), cfg.sigma_data))
    saved = ctx.stored(sample=recipe("renoise", levels, ctx, "scm"))
    apply = net_apply(ctx.teacher.model)
    return simple_method(
        ctx,
        cfg,
        init_state=init_scm_state,
        make_step=make_scm_step,
        saved=saved,
        apply_student=apply,
        apply_teacher=apply,
    )


def _aux_model(ctx: DistillContext) -> nn.Module:
    """The teacher's network with the zero-initialised ``aux_time`` input."""
    config = ml_collections.ConfigDict(ctx.teacher.config.to_dict())
    config.model.aux_time_embed = True
    return build_model(config, ctx.teacher.num_classes)


def build_meanflow(ctx: DistillContext) -> Method:
    """MeanFlow from the teacher's velocity, ``u`` read through the teacher's formulation."""
    rng = _teacher_range(ctx)
    t_max = rng["sigma_max"] / (1.0 + rng["sigma_max"])
    cfg = method_config(
        ctx, "meanflow", MeanFlowConfig, teacher_t_range=(1e-3, t_max), label_scale=1.0
    )
    if cfg.label_scale != 1.0:
        raise InvalidArgumentError(
            "config.meanflow.label_scale must be 1: the student reads the teacher's labels"
        )
    k = sample_levels(ctx, "meanflow")
    times = np.linspace(cfg.teacher_t_range[1], 0.0, k + 1)[:-1]
    levels = times / (1.0 - times)  # the EDM sigmas of the jump times
    model = _aux_model(ctx)
    saved = ctx.stored(
        sample=recipe(MEANFLOW, levels, ctx, "meanflow"), model={"aux_time_embed": True}
    )
    return simple_method(
        ctx,
        cfg,
        init_state=init_meanflow_state,
        make_step=make_meanflow_step,
        saved=saved,
        apply_student=denoiser_velocity(net_apply(model), ctx.teacher.formulation),
        apply_teacher=net_apply(ctx.teacher.model),
        student_model=model,
    )


def build_progressive(ctx: DistillContext) -> Method:
    """Progressive distillation; the student samples with Euler on its final grid."""
    cfg = method_config(ctx, "progressive", ProgressiveConfig, **_teacher_range(ctx))
    grid = cfg.sigmas()[:-1]  # the final student's levels (the nested grid, without 0)
    saved = ctx.stored(sample=recipe("euler", grid, ctx, "progressive"))
    apply = net_apply(ctx.teacher.model)
    return simple_method(
        ctx,
        cfg,
        init_state=init_progressive_state,
        make_step=make_progressive_step,
        saved=saved,
        apply_student=apply,
        apply_teacher=apply,
    )


def build_guidance_distill(ctx: DistillContext) -> Method:
    """Guidance distillation: one evaluation of the student = CFG at its input ``w``."""
    if ctx.teacher.num_classes == 0:
        raise InvalidArgumentError(
            "config.method=guidance_distill needs a class-conditional teacher trained with "
            "label dropout (CFG); this teacher is unconditional"
        )
    cfg = method_config(
        ctx, "guidance_distill", GuidanceDistillConfig, num_classes=ctx.teacher.num_classes
    )
    scale = float(ctx.section("guidance_distill").get("sample_scale", 2.0))
    sample = {
        "guidance": f"cfg:{scale:g}",
        "guidance_input": GUIDANCE_INPUT,
        "aux_scale": float(cfg.aux_scale),
    }
    model = _aux_model(ctx)
    saved = ctx.stored(sample=sample, model={"aux_time_embed": True})
    return simple_method(
        ctx,
        cfg,
        init_state=init_guidance_distill_state,
        make_step=make_guidance_distill_step,
        saved=saved,
        apply_student=net_apply(model),
        apply_teacher=net_apply(ctx.teacher.model),
        student_model=model,
    )


BUILDERS = {
    "cd": build_cd,
    "ct": build_ct,
    "scm": build_scm,
    "meanflow": build_meanflow,
    "progressive": build_progressive,
    "guidance_distill": build_guidance_distill,
}
"""``config.method`` -> builder (f-distill's is in :mod:`jaxdiff.experiment.distill_fdistill`)."""

__all__ = [
    "BUILDERS",
    "build_cd",
    "build_ct",
    "build_guidance_distill",
    "build_meanflow",
    "build_progressive",
    "build_scm",
]
