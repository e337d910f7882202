"""f-distill's generator and critic losses; :mod:`jaxdiff.distill.fdistill` builds the steps.

Generator loss (per batch, ``t`` uniform in ``gen_t_range``, ``x_t = G(z) + sigma(t) eps``)::

    r   = clip(exp(clip(mean_heads D(x_t), +-10)), 0.1, 20)        # fp32, no gradient
    r  <- r / bin_mean[bin(t)]            # per-time-bin (t or sigma: time_bin_coordinate)
    h   = h_f(r) / mean(h_f(r))                                     # per-batch, mean 1
    L_G = vsd_loss(G(z), x0_p(x_t), x0_q(x_t), h) + gan_weight * softplus(-D(x_t))

Critic loss: ``DSM(fake on sg(G(z))) + disc_weight * [softplus(D_fake) + softplus(-D_real)]
+ r1_weight * R1``, where real images (the data the teacher learned) and generator samples
are noised at independent ``t``. Approximate R1 is ``mean((D(x_t) - D(x_p))^2)`` at the real
sample's level, with ``x_p = x_t + r1_noise eps`` (``r1_perturb="noised"``) or FastGen's
``x_p = x + r1_noise eps`` (``"clean"``: the clean real image, not re-noised).

Time ``t`` in [0, 1] maps to noise by Karras' interpolation, ``t = 1`` being
``sigma_max`` (:func:`sigma_of_t`); f-distill samples ``t`` uniformly over Karras
indices 2..998 of 1000, here ``gen_t_range = (0.002, 0.998)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jaxdiff.distill import pool as pool_lib
from jaxdiff.distill.features import input_features
from jaxdiff.distill.few_step import backward_simulate
from jaxdiff.distill.losses import dmd2_loss, r1_approx, vsd_loss
from jaxdiff.distill.ratio import bin_coordinate, density_ratio, f_weights, time_bin_normalize

if TYPE_CHECKING:
    # Annotations only: fdistill imports this module to build its steps, so a runtime
    # import back would be circular.
    from jaxdiff.distill.fdistill import DistillState, FDistillConfig, Nets

Batch = dict[str, jax.Array]


def sigma_of_t(t: jax.Array, cfg: FDistillConfig) -> jax.Array:
    """Karras interpolation: ``t = 0`` is ``sigma_min``, ``t = 1`` is ``sigma_max``."""
    lo, hi = cfg.sigma_min ** (1.0 / cfg.rho), cfg.sigma_max ** (1.0 / cfg.rho)
    return (lo + jnp.asarray(t, jnp.float32) * (hi - lo)) ** cfg.rho


def _uniform_t(key, n, t_range):
    return jax.random.uniform(key, (n,), jnp.float32, t_range[0], t_range[1])


def _noised(key, x, t, cfg):
    sigma = sigma_of_t(t, cfg)
    eps = jax.random.normal(key, x.shape, jnp.float32)
    return x + sigma.reshape(sigma.shape + (1,) * (x.ndim - 1)) * eps, sigma


def _noise_label(sigma):
    return jnp.log(sigma) / 4.0


def _masked_mean(v, mask):
    # v [H, B, P] or [H, B]; mask [H, B]
    if v.ndim == 3:
        v = jnp.mean(v, axis=2)
    return jnp.sum(v * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def generate(
    nets: Nets,
    cfg: FDistillConfig,
    gen_params: Any,
    noise: jax.Array,
    cond: Any,
    key: jax.Array,
    num_active: jax.Array | None = None,
) -> jax.Array:
    """Student samples (with gradients through the last step); backward simulation if K > 1."""

    def gen(p, x, sigma, c):
        return nets.student(p, x, sigma, c)[0]

    x, _ = backward_simulate(gen, gen_params, noise, cond, cfg.student_sigmas, key, num_active)
    return x


def _features(nets, cfg, which_params, x_t, sigma, cond, teacher_out, fake_out):
    if cfg.extractor == "input":
        return input_features(x_t, sigma, cfg.sigma_data)
    if cfg.extractor == "teacher":
        return (
            teacher_out[1]
            if teacher_out is not None
            else nets.teacher(which_params, x_t, sigma, cond)[1]
        )
    return fake_out[1] if fake_out is not None else nets.student(which_params, x_t, sigma, cond)[1]


def generator_loss(
    gen_params: Any,
    others: tuple[DistillState, Any],
    batch: Batch,
    key: jax.Array,
    *,
    nets: Nets,
    cfg: FDistillConfig,
    num_active: jax.Array | None = None,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array]]:
    """f-distill's generator loss; ``others = (state, teacher_params)``.

    Returns:
        ``(loss, (metrics, new_bin_means))``.
    """
    state, teacher_params = others
    cond = batch.get("label")
    images = batch["image"]
    b = images.shape[0]
    k_z, k_sim, k_t, k_eps = jax.random.split(key, 4)
    z = jax.random.normal(k_z, images.shape, jnp.float32)
    x = generate(nets, cfg, gen_params, z, cond, k_sim, num_active)
    t = _uniform_t(k_t, b, cfg.gen_t_range)
    x_t, sigma = _noised(k_eps, x, t, cfg)
    fake_params = jax.lax.stop_gradient(state.fake.params)
    teacher_out = nets.teacher(teacher_params, x_t, sigma, cond)
    fake_out = nets.student(fake_params, x_t, sigma, cond)
    x0_p, x0_q = teacher_out[0], fake_out[0]
    feats = _features(nets, cfg, None, x_t, sigma, cond, teacher_out, fake_out)
    disc_params = jax.lax.stop_gradient(state.disc.params)
    ratio_logits, loss_logits, mask = pool_lib.pool_logits(
        nets.head, disc_params, nets.pool_spec, feats, _noise_label(sigma), cond, t, cfg.num_groups
    )
    r = density_ratio(
        pool_lib.masked_head_mean(ratio_logits, mask),
        logit_clip=cfg.logit_clip,
        lo=cfg.ratio_range[0],
        hi=cfg.ratio_range[1],
    )
    coord, coord_range = bin_coordinate(
        t, sigma, cfg.time_bin_coordinate, (cfg.sigma_min, cfg.sigma_max)
    )
    r_norm, bins = time_bin_normalize(
        r, coord, state.bin_means, t_range=coord_range, ema=cfg.bin_ema
    )
    if cfg.divergence == "dmd2":
        h = jnp.ones_like(r)
        dm = dmd2_loss(x, x0_p, x0_q)
    else:
        h = f_weights(r_norm, cfg.divergence)
        dm = vsd_loss(x, x0_p, x0_q, h)
    if cfg.gan_loss == "nonsat":
        g_vals = jax.nn.softplus(-loss_logits)
    else:
        g_vals = -loss_logits
    gan = _masked_mean(g_vals, mask)
    loss = dm + cfg.gan_weight * gan
    metrics = {
        "gen_loss": loss,
        "dm_loss": dm,
        "gan_g": gan,
        "log_ratio": jnp.mean(jnp.log(r)),
        "h_max": jnp.max(h),
    }
    return loss, (metrics, bins)


def critic_loss(
    critic_params: dict[str, Any],
    others: tuple[DistillState, Any],
    batch: Batch,
    key: jax.Array,
    *,
    nets: Nets,
    cfg: FDistillConfig,
    head_idx: jax.Array | None = None,
    num_active: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Fake-score denoising loss + discriminator loss (+ R1); params ``{"fake", "disc"}``.

    ``head_idx`` selects the pool heads trained this step (default all).
    """
    state, teacher_params = others
    fake_params, disc_params = critic_params["fake"], critic_params["disc"]
    cond = batch.get("label")
    real = batch["image"].astype(jnp.float32)
    b = real.shape[0]
    k_z, k_sim, k_tf, k_ef, k_tq, k_eq, k_tr, k_er, k_r1 = jax.random.split(key, 9)
    z = jax.random.normal(k_z, real.shape, jnp.float32)
    x = jax.lax.stop_gradient(generate(nets, cfg, state.gen.params, z, cond, k_sim, num_active))

    # Fake score: denoising loss on generator samples, EDM weight 1/sigma^2 + 1/sigma_data^2.
    tq = _uniform_t(k_tq, b, cfg.fake_t_range)
    xq_t, sq = _noised(k_eq, x, tq, cfg)
    x0_fake = nets.student(fake_params, xq_t, sq, cond)[0]
    lam = 1.0 / sq**2 + 1.0 / cfg.sigma_data**2
    err = jnp.mean(((x0_fake - x) ** 2).reshape(b, -1), axis=1)
    dsm = jnp.mean(lam * err)

    # Discriminator: noised real vs noised generator samples at independent t.
    which = teacher_params if cfg.extractor == "teacher" else fake_params
    t_f = _uniform_t(k_tf, b, cfg.disc_t_range)
    t_r = _uniform_t(k_tr, b, cfg.disc_t_range)
    xf_t, s_f = _noised(k_ef, x, t_f, cfg)
    xr_t, s_r = _noised(k_er, real, t_r, cfg)

    def logits(x_t, sigma, t):
        feats = _features(nets, cfg, which, x_t, sigma, cond, None, None)
        return pool_lib.pool_logits(
            nets.head,
            disc_params,
            nets.pool_spec,
            feats,
            _noise_label(sigma),
            cond,
            t,
            cfg.num_groups,
            head_idx,
        )

    _, lf, mf = logits(xf_t, s_f, t_f)
    _, lr, mr = logits(xr_t, s_r, t_r)
    if cfg.gan_loss == "nonsat":
        d_fake, d_real = jax.nn.softplus(lf), jax.nn.softplus(-lr)
    else:
        d_fake, d_real = jax.nn.relu(1.0 + lf), jax.nn.relu(1.0 - lr)
    gan_d = _masked_mean(d_fake, mf) + _masked_mean(d_real, mr)
    loss = dsm + cfg.disc_weight * gan_d
    metrics = {"dsm_loss": dsm, "gan_d": gan_d}
    if cfg.r1_weight > 0:
        eps = jax.random.normal(k_r1, real.shape, jnp.float32)
        # FastGen ("clean") perturbs the real image itself and shows it at t_real as is.
        xr_p = (xr_t if cfg.r1_perturb == "noised" else real) + cfg.r1_noise * eps
        rr, _, _ = logits(xr_t, s_r, t_r)
        rp, _, _ = logits(xr_p, s_r, t_r)
        r1 = r1_approx(rr, rp)
        loss = loss + cfg.r1_weight * r1
        metrics["r1"] = r1
    metrics["critic_loss"] = loss
    return loss, metrics


__all__ = ["critic_loss", "generate", "generator_loss", "sigma_of_t"]
