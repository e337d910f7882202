"""Distillation of diffusion models: f-distill / DMD2, discriminator pools, few-step students.

Pure losses and step builders live one concept per module:

* :mod:`~jaxdiff.distill.divergences`: ``h(r)`` and ``f`` per f-divergence;
* :mod:`~jaxdiff.distill.ratio`: density ratio and the two-stage weight normalisation;
* :mod:`~jaxdiff.distill.losses`: VSD (weighted DMD), DMD2 reference, GAN, R1;
* :mod:`~jaxdiff.distill.heads`, :mod:`~jaxdiff.distill.pool`: discriminator heads and pools;
* :mod:`~jaxdiff.distill.features`: UNet denoise-and-features functions;
* :mod:`~jaxdiff.distill.few_step`: backward simulation, bottom-up refinement, sampling;
* :mod:`~jaxdiff.distill.fdistill_losses`: f-distill's generator and critic losses;
* :mod:`~jaxdiff.distill.fdistill`: f-distill's config, state and sharded steps;
* :mod:`~jaxdiff.distill.hybrid`: diversity distillation's hybrid sampler;
* :mod:`~jaxdiff.distill.consistency_core`, :mod:`~jaxdiff.distill.consistency`:
  consistency distillation (CD), ECT-style consistency training (CT), multistep sampling;
* :mod:`~jaxdiff.distill.trigflow`, :mod:`~jaxdiff.distill.scm`: TrigFlow and
  continuous-time consistency (sCD / sCT);
* :mod:`~jaxdiff.distill.meanflow`: MeanFlow's average-velocity model;
* :mod:`~jaxdiff.distill.progressive`: progressive distillation (halve the steps a round);
* :mod:`~jaxdiff.distill.guidance_distill`: guidance distillation (CFG at scale ``w`` in
  one evaluation, ``w`` a network input);
* the config-driven run, ``distill_and_evaluate(config, workdir)``, is in
  :mod:`jaxdiff.experiment.distill`.
"""

from jaxdiff.distill.consistency import (
    CDConfig,
    CDState,
    CTConfig,
    CTState,
    consistency_state_shardings,
    init_cd_state,
    init_ct_state,
    make_cd_step,
    make_ct_step,
    sample_cd,
    sample_ct,
)
from jaxdiff.distill.consistency_core import ConsistencyFormulation, ect_r, multistep_sample
from jaxdiff.distill.divergences import DIVERGENCES, generator_f, weighting
from jaxdiff.distill.fdistill import (
    SCHEDULES,
    DistillState,
    FDistillConfig,
    Nets,
    generator_updates_before,
    is_generator_step,
    iteration_updates,
    jit_steps,
    make_steps,
)
from jaxdiff.distill.fdistill_losses import critic_loss, generator_loss
from jaxdiff.distill.few_step import backward_simulate, few_step_sample, student_sigmas
from jaxdiff.distill.guidance_distill import (
    GuidanceDistillConfig,
    GuidanceDistillState,
    graft_params,
    guidance_distill_state_shardings,
    guided_student_denoiser,
    init_guidance_distill_state,
    make_guidance_distill_step,
)
from jaxdiff.distill.heads import HEAD_FORMS
from jaxdiff.distill.hybrid import hybrid_sample
from jaxdiff.distill.losses import dmd2_loss, gan_d_loss, gan_g_loss, vsd_loss
from jaxdiff.distill.meanflow import (
    MeanFlowConfig,
    MeanFlowState,
    denoiser_velocity,
    init_meanflow_state,
    make_meanflow_step,
    sample_meanflow,
)
from jaxdiff.distill.pool import per_head
from jaxdiff.distill.progressive import (
    ProgressiveConfig,
    ProgressiveState,
    init_progressive_state,
    make_progressive_step,
    progressive_sigmas,
    progressive_state_shardings,
    sample_progressive,
)
from jaxdiff.distill.ratio import (
    TIME_BIN_COORDINATES,
    bin_coordinate,
    density_ratio,
    f_weights,
    time_bin_normalize,
)
from jaxdiff.distill.scm import SCMConfig, SCMState, init_scm_state, make_scm_step, sample_scm
from jaxdiff.distill.trigflow import sigma_from_trig, teacher_velocity, trig_from_sigma

__all__ = [
    "GuidanceDistillConfig",
    "GuidanceDistillState",
    "ProgressiveConfig",
    "ProgressiveState",
    "denoiser_velocity",
    "graft_params",
    "guidance_distill_state_shardings",
    "guided_student_denoiser",
    "init_guidance_distill_state",
    "init_progressive_state",
    "make_guidance_distill_step",
    "make_progressive_step",
    "progressive_sigmas",
    "progressive_state_shardings",
    "sample_progressive",
    "CDConfig",
    "CDState",
    "CTConfig",
    "CTState",
    "ConsistencyFormulation",
    "MeanFlowConfig",
    "MeanFlowState",
    "SCMConfig",
    "SCMState",
    "consistency_state_shardings",
    "ect_r",
    "init_cd_state",
    "init_ct_state",
    "init_meanflow_state",
    "init_scm_state",
    "make_cd_step",
    "make_ct_step",
    "make_meanflow_step",
    "make_scm_step",
    "multistep_sample",
    "sample_cd",
    "sample_ct",
    "sample_meanflow",
    "sample_scm",
    "sigma_from_trig",
    "teacher_velocity",
    "trig_from_sigma",
    "DIVERGENCES",
    "HEAD_FORMS",
    "SCHEDULES",
    "TIME_BIN_COORDINATES",
    "bin_coordinate",
    "generator_updates_before",
    "iteration_updates",
    "per_head",
    "DistillState",
    "FDistillConfig",
    "Nets",
    "backward_simulate",
    "critic_loss",
    "density_ratio",
    "dmd2_loss",
    "f_weights",
    "few_step_sample",
    "gan_d_loss",
    "gan_g_loss",
    "generator_f",
    "generator_loss",
    "hybrid_sample",
    "is_generator_step",
    "jit_steps",
    "make_steps",
    "student_sigmas",
    "time_bin_normalize",
    "vsd_loss",
    "weighting",
]
