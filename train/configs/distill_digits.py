"""Distils the digits teacher into a few-step student, with any of seven methods.

Usage::

    python -m train --config=train/configs/distill_digits.py \
        --config.teacher=runs/digits --workdir=runs/digits_student [--config.method=NAME]
    python -m sample --workdir=runs/digits_student          # samples as it was trained

``config.method``: ``fdistill`` (f-distill, DMD2 for ``rkl``; the default), ``cd``
(consistency distillation), ``ct`` (ECT consistency training), ``scm`` (continuous-time
consistency, sCD), ``meanflow``, ``progressive`` or ``guidance_distill``. Each method's
knobs are the section of its name (f-distill's is ``distill``); its ``num_steps`` is the
default budget, sized to finish within 10 minutes on a 2-core CPU. See
docs/distillation.md and docs/few_step.md.
"""

import ml_collections

from train.configs.common import base_config


def get_config():
    c = base_config()
    c.method = "fdistill"
    c.teacher = ml_collections.FieldReference(None, field_type=str)  # the teacher's workdir
    c.teacher_ema = "default"  # "default" (its first EMA), a rate like "0.999", or "none"

    d = c.distill = ml_collections.ConfigDict()  # method "fdistill"
    d.num_steps = 2400  # iterations (critic + generator updates), ~6 min at 6.9 it/s
    d.divergence = "rkl"  # rkl (= DMD2), srkl, js, sh, fkl, jeffreys, alpha:A
    d.gan_weight = 1e-3  # lambda_GAN of the generator
    d.disc_weight = 1.0  # weight of the discriminator loss in the critic loss
    d.gan_loss = "nonsat"  # or "hinge"
    d.r1_weight = 0.0  # approximate R1 gamma
    d.r1_noise = 0.1  # approximate R1's perturbation scale
    d.r1_perturb = "noised"  # or "clean" (FastGen: perturb the clean real image)
    d.critic_steps = 4  # fake-score + discriminator updates per generator update
    d.schedule = "alternate"  # or "dmd2" (critic also steps on generator iterations)
    d.num_time_bins = 10
    d.bin_ema = 0.0
    d.time_bin_coordinate = "karras_index"  # or "sigma" (FastGen's EDM bins)
    d.gen_t_range = (0.002, 0.998)  # Karras indices 2..998 of 1000
    d.fake_t_range = (0.0, 1.0)
    d.disc_t_range = (0.0, 1.0)
    d.student_steps = 1  # 1..4 (backward simulation when > 1)
    d.refine_stage_steps = 0  # bottom-up refinement: generator updates per stage (0 = off)
    d.teacher_guidance = 1.0  # CFG scale of the teacher's score (1 = none)
    d.extractor = "teacher"  # discriminator features: teacher, fake (DMD2) or input
    d.feature_names = ("enc0", "enc1", "mid")  # UNet features: 8x8, 4x4 and the bottleneck
    d.head_width = 32
    d.head_form = "jaxdiff"  # or "dmd2" (DMD2's layout; needs features of 8x8 or more)
    d.num_heads = 1  # > 1: a NitroFusion pool
    d.head_kinds = ("global_cond",)  # e.g. ("global_cond", "local_cond", "local_uncond")
    d.num_groups = 1  # noise-level groups of the heads
    d.heads_per_step = 1
    d.refresh_fraction = 0.0

    # Generator optimizer (stored as the student's config.optim); the critic's (fake score
    # and discriminator, separate optax states) below.
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 0
    c.optim.grad_clip = 10.0
    c.optim.weight_decay = 0.01
    c.critic_optim = ml_collections.ConfigDict(c.optim.to_dict())
    c.critic_optim.learning_rate = 2e-4

    # None: the method's own budget, config.<method>.num_steps.
    c.train.num_steps = ml_collections.FieldReference(None, field_type=int)
    c.train.batch_size = 64
    c.train.ema_rates = (0.99,)
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2

    add_few_step_methods(c)

    c.sample.solver = "euler"
    c.sample.steps = 1
    c.sample.guidance = "none"
    c.sample.grid_size = 100
    c.sample.grid_scale = 4
    return c


def add_few_step_methods(c: ml_collections.ConfigDict) -> None:
    """The sections of the consistency family, MeanFlow, progressive and guidance distillation.

    ``sample_levels`` is K, the levels stored in the student's sampling recipe, and
    ``sample_steps`` how many of them ``python -m sample`` uses by default;
    ``learning_rate``, where set, replaces ``config.optim.learning_rate`` for that method.
    """
    # Consistency distillation (Song et al. 2023); Heun teacher steps on N Karras levels.
    c.cd = ml_collections.ConfigDict()
    c.cd.num_steps = 950  # ~6 min at 2.6 steps/s (a Heun teacher step per update)
    c.cd.num_levels = 18
    c.cd.sigma_min = 0.002
    c.cd.solver = "heun"
    c.cd.metric = "l2"
    c.cd.weighting = "uniform"
    # iCT's stop-gradient target (mu = 0): one step FD 0.65 against 1.21 for Song et al.'s
    # 0.95 at the same 360 steps (docs/distillation.md).
    c.cd.target_ema = 0.0
    c.cd.sample_levels = 4
    c.cd.sample_steps = 1
    # Consistency training, ECT's form (no teacher calls; tuned from the teacher's weights).
    c.ct = ml_collections.ConfigDict()
    c.ct.num_steps = 3100  # ~6 min at 8.7 steps/s
    c.ct.stage_length = 480  # the gap t - r halves every stage (6.5 stages)
    c.ct.q = 2.0
    c.ct.sigma_min = 0.0
    c.ct.metric = "pseudo_huber"
    c.ct.weighting = "inverse_dt"
    c.ct.sample_levels = 4
    c.ct.sample_steps = 1
    # sCM (TrigFlow, sCD with the teacher's velocity; mode="train" is sCT).
    c.scm = ml_collections.ConfigDict()
    c.scm.num_steps = 2300  # ~6 min at 6.4 steps/s
    c.scm.mode = "distill"
    c.scm.tangent_warmup_steps = 200
    # The paper's "learned" weighting made the digits student worse than its start, and
    # "uniform" improved it 2.5x, both at 950 steps (docs/distillation.md).
    c.scm.weighting = "uniform"
    # At the config's 1e-4 the student drifts (the tangent norm keeps growing) and ends
    # worse the longer it trains; 3e-5 was the best of 1e-4, 3e-5 and 1e-5 at 2,300 steps.
    c.scm.learning_rate = 3e-5  # replaces config.optim's for this method
    c.scm.p_mean = -1.0
    c.scm.p_std = 1.4
    c.scm.sample_levels = 4
    c.scm.sample_steps = 1
    # MeanFlow with the teacher's velocity (velocity="data" trains from data alone).
    c.meanflow = ml_collections.ConfigDict()
    c.meanflow.num_steps = 2300  # ~6 min at 6.4 steps/s
    c.meanflow.learning_rate = 3e-4  # replaces config.optim's for this method
    c.meanflow.velocity = "teacher"
    c.meanflow.ratio_r_neq_t = 0.75
    c.meanflow.time_dist = "logit_normal"  # or "uniform"
    c.meanflow.logit_mean = -0.4
    c.meanflow.logit_std = 1.0
    c.meanflow.norm_p = 1.0
    c.meanflow.sample_levels = 4
    c.meanflow.sample_steps = 1
    # Progressive distillation: 16 Euler steps halved each round down to 16 / 2^rounds.
    c.progressive = ml_collections.ConfigDict()
    c.progressive.num_steps = 2600  # ~6 min at 7.3 steps/s
    c.progressive.start_steps = 16
    c.progressive.rounds = 4
    c.progressive.steps_per_round = 650
    c.progressive.learning_rate = 3e-4
    # Guidance distillation: one student evaluation = CFG at the scale w it is given.
    c.guidance_distill = ml_collections.ConfigDict()
    c.guidance_distill.num_steps = 2800  # ~6 min at 7.9 steps/s
    c.guidance_distill.learning_rate = 3e-4
    c.guidance_distill.w_min = 1.0
    c.guidance_distill.w_max = 4.0
    c.guidance_distill.sample_scale = 2.0  # the recipe's default --guidance=cfg:W
