"""f-distill (Xu et al. 2025; DMD2 when ``divergence="rkl"``): losses and step builders.

Three networks, each with its own optax state:

* generator ``G``: the student denoiser, initialised from the teacher; a one-step sample is
  ``G(sigma_max z, sigma_max, c)``; K-step students use backward simulation
  (:mod:`jaxdiff.distill.few_step`);
* fake score ``x0_q``: initialised from the teacher, trained with the denoising loss on
  ``sg(G(z))`` (the *critic* step);
* discriminator: a pool of heads (:mod:`jaxdiff.distill.pool`; one head = DMD2) on
  features of noisy images from the frozen teacher (``extractor="teacher"``, default), the
  fake score's encoder (``"fake"``, DMD2: the GAN loss then trains that encoder too) or
  the noisy input itself (``"input"``). Its logits estimate ``log(p_teacher / p_student)``.

Generator loss (per batch, ``t`` uniform in ``gen_t_range``, ``x_t = G(z) + sigma(t) eps``)::

    r   = clip(exp(clip(mean_heads D(x_t), +-10)), 0.1, 20)        # fp32, no gradient
    r  <- r / bin_mean[bin(t)]                                      # per-time-bin
    h   = h_f(r) / mean(h_f(r))                                     # per-batch, mean 1
    L_G = vsd_loss(G(z), x0_p(x_t), x0_q(x_t), h) + gan_weight * softplus(-D(x_t))

Critic loss: ``DSM(fake on sg(G(z))) + disc_weight * [softplus(D_fake) + softplus(-D_real)]
+ r1_weight * R1``, where real images (the data the teacher learned) and generator samples
are noised at independent ``t``. The two-time-scale rule (``critic_steps`` critic updates
per generator update) is the driver's: :func:`is_generator_step`.

Time ``t`` in [0, 1] maps to noise by Karras' interpolation, ``t = 1`` being
``sigma_max`` (:func:`sigma_of_t`); f-distill samples ``t`` uniformly over Karras
indices 2..998 of 1000, here ``gen_t_range = (0.002, 0.998)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxdiff.distill import pool as pool_lib
from jaxdiff.distill.features import DenoiseFeats, input_features
from jaxdiff.distill.few_step import backward_simulate
from jaxdiff.distill.heads import DiscHead
from jaxdiff.distill.losses import dmd2_loss, r1_approx, vsd_loss
from jaxdiff.distill.ratio import density_ratio, f_weights, time_bin_normalize
from jaxdiff.parallel import batch_sharding, replicated
from jaxdiff.training.state import TrainState, update_ema

Batch = dict[str, jax.Array]
EXTRACTORS = ("teacher", "fake", "input")


@dataclasses.dataclass(frozen=True)
class FDistillConfig:
    """Hyperparameters of f-distill (hashable: closed over by the jitted steps).

    Attributes:
        divergence: key of :data:`jaxdiff.distill.divergences.H` (``rkl`` = DMD2,
            ``srkl``, ``js``, ``sh``, ``fkl``, ``jeffreys``, ``alpha:A``) or ``"dmd2"``
            (DMD2's own loss code path, for checking that ``rkl`` equals it).
        gan_weight: lambda_GAN of the generator's GAN term (f-distill needs it > 0).
        disc_weight: weight of the discriminator loss in the critic loss.
        gan_loss: ``"nonsat"`` or ``"hinge"``.
        r1_weight: approximate-R1 weight gamma (0 = off).
        r1_noise: perturbation scale of approximate R1.
        num_time_bins: bins of the per-time ratio normalisation.
        bin_ema: EMA rate of the per-bin means (0 = this batch only).
        logit_clip: clip of the logits before ``exp``.
        ratio_range: clip of the ratio ``r``.
        sigma_min: smallest noise level of the time grid.
        sigma_max: largest noise level (the one-step generator's input level).
        rho: Karras warping of the time grid.
        gen_t_range: ``t`` range of the generator's VSD/GAN noise.
        fake_t_range: ``t`` range of the fake score's denoising loss.
        disc_t_range: ``t`` range of the discriminator's noise.
        student_sigmas: the student's input noise levels (one entry = one-step).
        extractor: discriminator features: ``"teacher"``, ``"fake"`` or ``"input"``.
        num_heads: heads in the discriminator pool.
        head_kinds: cycle of head kinds (:data:`jaxdiff.distill.pool.HEAD_KINDS`).
        num_groups: noise-level groups of the heads.
        heads_per_step: heads trained each critic step (>= num_heads: all).
        refresh_fraction: fraction of heads re-initialised each critic step.
        sigma_data: the formulation's data std (scales the ``"input"`` features).
    """

    divergence: str = "rkl"
    gan_weight: float = 1e-3
    disc_weight: float = 1.0
    gan_loss: str = "nonsat"
    r1_weight: float = 0.0
    r1_noise: float = 0.1
    num_time_bins: int = 10
    bin_ema: float = 0.0
    logit_clip: float = 10.0
    ratio_range: tuple[float, float] = (0.1, 20.0)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    gen_t_range: tuple[float, float] = (0.002, 0.998)
    fake_t_range: tuple[float, float] = (0.0, 1.0)
    disc_t_range: tuple[float, float] = (0.0, 1.0)
    student_sigmas: tuple[float, ...] = (80.0,)
    extractor: str = "teacher"
    num_heads: int = 1
    head_kinds: tuple[str, ...] = ("global_cond",)
    num_groups: int = 1
    heads_per_step: int = 1
    refresh_fraction: float = 0.0
    sigma_data: float = 0.5

    def validate(self) -> None:
        """Raises ValueError naming the bad field and its fix."""
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"extractor={self.extractor!r}: choose one of {EXTRACTORS}")
        if self.gan_weight <= 0 and self.divergence not in ("rkl", "dmd2"):
            raise ValueError(
                f"divergence={self.divergence!r} takes its density ratio from the "
                "discriminator: set gan_weight > 0 (f-distill asserts lambda_GAN > 0)"
            )
        if not self.student_sigmas:
            raise ValueError("student_sigmas must hold at least one noise level")
        if self.heads_per_step < 1:
            raise ValueError(f"heads_per_step must be >= 1, got {self.heads_per_step}")
        if not 0.0 <= self.refresh_fraction < 1.0:
            raise ValueError(f"refresh_fraction must lie in [0, 1), got {self.refresh_fraction}")


class Nets(NamedTuple):
    """The pure network functions of a run (teacher frozen: gradients reach its input only).

    Attributes:
        student: ``fn(params, x, sigma, cond) -> (x0, feats)`` of the generator/fake
            architecture (the teacher's).
        teacher: the same for the teacher, possibly with guidance.
        head: the discriminator head module (params live in the pool).
        pool_spec: per-head flags.
        init_pool: ``key -> stacked head params`` (fresh heads, for init and refresh).
    """

    student: DenoiseFeats
    teacher: DenoiseFeats
    head: DiscHead
    pool_spec: pool_lib.PoolSpec
    init_pool: Callable[[jax.Array], Any]


@flax.struct.dataclass
class DistillState:
    """Everything a distillation run carries; the teacher's params are passed separately.

    Attributes:
        step: critic + generator iterations done.
        gen: the generator's params, EMA and optax state.
        fake: the fake score's params and optax state.
        disc: the discriminator pool's stacked params and optax state.
        bin_means: ``[num_time_bins]`` running per-time-bin mean ratios.
    """

    step: jax.Array
    gen: TrainState
    fake: TrainState
    disc: TrainState
    bin_means: jax.Array


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
    r_norm, bins = time_bin_normalize(r, t, state.bin_means, ema=cfg.bin_ema)
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
        xr_p = xr_t + cfg.r1_noise * eps
        rr, _, _ = logits(xr_t, s_r, t_r)
        rp, _, _ = logits(xr_p, s_r, t_r)
        r1 = r1_approx(rr, rp)
        loss = loss + cfg.r1_weight * r1
        metrics["r1"] = r1
    metrics["critic_loss"] = loss
    return loss, metrics


def is_generator_step(step: int, critic_steps: int) -> bool:
    """Two time-scale rule: every ``critic_steps + 1``-th iteration updates the generator.

    Iterations ``0..critic_steps-1`` of each cycle update the fake score and the
    discriminator, the last one the generator (DMD2's ``dfake_gen_update_ratio`` is
    ``critic_steps + 1``).
    """
    return step % (critic_steps + 1) == critic_steps


def init_distill_state(
    gen_params: Any,
    fake_params: Any,
    pool_params: Any,
    txs: tuple[optax.GradientTransformation, ...],
    cfg: FDistillConfig,
    ema_rates: tuple[float, ...] = (),
) -> DistillState:
    """Builds the initial state; the three param trees are copied (no aliasing)."""
    from jaxdiff.training.state import create_train_state

    tx_gen, tx_fake, tx_disc = txs
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731
    return DistillState(
        step=jnp.zeros((), jnp.int32),
        gen=create_train_state(copy(gen_params), tx_gen, ema_rates),
        fake=create_train_state(copy(fake_params), tx_fake, ()),
        disc=create_train_state(copy(pool_params), tx_disc, ()),
        bin_means=jnp.ones((cfg.num_time_bins,), jnp.float32),
    )


def make_steps(
    nets: Nets,
    cfg: FDistillConfig,
    txs: tuple[optax.GradientTransformation, ...],
    *,
    ema_warmup: bool = True,
) -> tuple[Callable, Callable]:
    """Returns the pure ``(gen_step, critic_step)``.

    Each is ``step(state, teacher_params, batch, key, num_active) -> (state, metrics)``;
    ``key`` is the run's base key (the step is folded in), ``num_active`` the steps of
    bottom-up refinement in use (see :func:`jaxdiff.distill.few_step.active_steps`).
    """
    cfg.validate()
    tx_gen, tx_fake, tx_disc = txs
    n_heads = nets.pool_spec.num_heads

    def gen_step(state: DistillState, teacher_params, batch, key, num_active):
        k = jax.random.fold_in(key, state.step)
        grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
        (_, (metrics, bins)), grads = grad_fn(
            state.gen.params,
            (state, teacher_params),
            batch,
            k,
            nets=nets,
            cfg=cfg,
            num_active=num_active,
        )
        updates, opt = tx_gen.update(grads, state.gen.opt_state, state.gen.params)
        params = optax.apply_updates(state.gen.params, updates)
        gen = TrainState(
            step=state.gen.step + 1,
            params=params,
            ema=update_ema(state.gen.ema, params, state.gen.step, ema_warmup),
            opt_state=opt,
        )
        metrics["gen_grad_norm"] = optax.tree.norm(grads)
        return state.replace(step=state.step + 1, gen=gen, bin_means=bins), metrics

    def critic_step(state: DistillState, teacher_params, batch, key, num_active):
        k = jax.random.fold_in(key, state.step)
        k_loss, k_sub, k_ref, k_init = jax.random.split(k, 4)
        idx = pool_lib.choose_subset(k_sub, n_heads, cfg.heads_per_step)
        params = {"fake": state.fake.params, "disc": state.disc.params}
        grad_fn = jax.value_and_grad(critic_loss, has_aux=True)
        (_, metrics), grads = grad_fn(
            params,
            (state, teacher_params),
            batch,
            k_loss,
            nets=nets,
            cfg=cfg,
            head_idx=idx,
            num_active=num_active,
        )
        upd, fake_opt = tx_fake.update(grads["fake"], state.fake.opt_state, state.fake.params)
        fake = TrainState(
            step=state.fake.step + 1,
            params=optax.apply_updates(state.fake.params, upd),
            ema=state.fake.ema,
            opt_state=fake_opt,
        )
        selected = jnp.zeros((n_heads,), bool).at[idx].set(True)
        pool, disc_opt = pool_lib.masked_apply(
            tx_disc, grads["disc"], state.disc.opt_state, state.disc.params, selected
        )
        if cfg.refresh_fraction > 0:
            mask = pool_lib.refresh_mask(k_ref, n_heads, cfg.refresh_fraction)
            pool, disc_opt = pool_lib.refresh(tx_disc, pool, disc_opt, nets.init_pool(k_init), mask)
        disc = TrainState(
            step=state.disc.step + 1, params=pool, ema=state.disc.ema, opt_state=disc_opt
        )
        metrics["critic_grad_norm"] = optax.tree.norm(grads)
        return state.replace(step=state.step + 1, fake=fake, disc=disc), metrics

    return gen_step, critic_step


def train_state_shardings(abstract: TrainState, p_shard: Any, tx, mesh: Mesh) -> TrainState:
    """Shardings of a TrainState: params, EMA and param-shaped optimizer leaves as ``p_shard``."""
    rep = replicated(mesh)
    opt = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, p_shard, transform_non_params=lambda _: rep
    )
    return TrainState(
        step=rep, params=p_shard, ema={k: p_shard for k in abstract.ema}, opt_state=opt
    )


def distill_state_shardings(
    abstract: DistillState, p_shard: Any, txs: tuple, mesh: Mesh
) -> DistillState:
    """Shardings of a DistillState.

    Generator and fake score follow the model's ``p_shard``; the (small) discriminator
    pool is replicated.
    """
    rep = replicated(mesh)
    pool_shard = jax.tree.map(lambda _: rep, abstract.disc.params)
    return DistillState(
        step=rep,
        gen=train_state_shardings(abstract.gen, p_shard, txs[0], mesh),
        fake=train_state_shardings(abstract.fake, p_shard, txs[1], mesh),
        disc=train_state_shardings(abstract.disc, pool_shard, txs[2], mesh),
        bin_means=rep,
    )


def jit_steps(
    steps: tuple[Callable, Callable],
    state_shardings: DistillState,
    teacher_shardings: Any,
    mesh: Mesh,
) -> tuple[Callable, Callable]:
    """Jits ``(gen_step, critic_step)`` with explicit shardings over ``mesh``; state donated."""
    rep = replicated(mesh)

    def jit(fn):
        return jax.jit(
            fn,
            in_shardings=(state_shardings, teacher_shardings, batch_sharding(mesh), rep, rep),
            out_shardings=(state_shardings, rep),
            donate_argnums=(0,),
        )

    return tuple(jit(f) for f in steps)


__all__ = [
    "EXTRACTORS",
    "DistillState",
    "FDistillConfig",
    "Nets",
    "critic_loss",
    "distill_state_shardings",
    "generate",
    "generator_loss",
    "init_distill_state",
    "is_generator_step",
    "jit_steps",
    "make_steps",
    "sigma_of_t",
    "train_state_shardings",
]
