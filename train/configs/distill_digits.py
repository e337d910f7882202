"""Distils the digits teacher into a one-step student with f-distill (DMD2 for ``rkl``).

Usage::

    python -m train --config=train/configs/distill_digits.py \
        --config.teacher=runs/digits --workdir=runs/digits_student
    python -m sample --workdir=runs/digits_student --steps=1

Sized for a 2-core CPU (a few minutes). See docs/distillation.md for the knobs.
"""

import ml_collections

from train.configs.common import base_config


def get_config():
    c = base_config()
    c.method = "distill"
    c.teacher = ml_collections.FieldReference(None, field_type=str)  # the teacher's workdir
    c.teacher_ema = "default"  # "default" (its first EMA), a rate like "0.999", or "none"

    d = c.distill = ml_collections.ConfigDict()
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

    c.train.num_steps = 600  # total iterations (critic + generator)
    c.train.batch_size = 64
    c.train.ema_rates = (0.99,)
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2

    c.sample.solver = "euler"
    c.sample.steps = 1
    c.sample.guidance = "none"
    c.sample.grid_size = 100
    c.sample.grid_scale = 4
    return c
