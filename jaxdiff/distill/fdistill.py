"""f-distill (Xu et al. 2025; DMD2 when ``divergence="rkl"``): config, state and steps.

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

The generator and critic losses live in :mod:`jaxdiff.distill.fdistill_losses` and are
re-exported here. The two-time-scale rule (``critic_steps`` critic updates per generator
update, :data:`SCHEDULES`) is the driver's: :func:`iteration_updates`.
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
from jaxdiff.distill.fdistill_losses import critic_loss, generate, generator_loss, sigma_of_t
from jaxdiff.distill.features import DenoiseFeats
from jaxdiff.distill.heads import HEAD_FORMS, DiscHead
from jaxdiff.distill.ratio import TIME_BIN_COORDINATES
from jaxdiff.parallel import batch_sharding, replicated
from jaxdiff.training.state import TrainState, copy_tree, train_state_shardings, update_ema

EXTRACTORS = ("teacher", "fake", "input")
R1_PERTURBS = ("noised", "clean")
"""Where approximate R1 adds its noise: to the noised real input ``x_t`` (jaxdiff) or to
the clean real image, judged at the real sample's level without re-noising (FastGen)."""
SCHEDULES = ("alternate", "dmd2")
"""Two-time-scale schedules (:func:`iteration_updates`)."""


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
        r1_perturb: what R1 perturbs (:data:`R1_PERTURBS`): ``"noised"`` compares
            ``D(x_t)`` with ``D(x_t + r1_noise eps)``; ``"clean"`` (FastGen) with
            ``D(x + r1_noise eps)`` at ``x_t``'s noise level, not re-noised.
        num_time_bins: bins of the per-time ratio normalisation.
        bin_ema: EMA rate of the per-bin means (0 = this batch only).
        time_bin_coordinate: what the bins split equally
            (:data:`jaxdiff.distill.ratio.TIME_BIN_COORDINATES`): ``"karras_index"``
            (``t`` in [0, 1]) or ``"sigma"`` (FastGen's EDM form, ``[sigma_min, sigma_max]``).
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
        head_form: image-branch layout of the heads
            (:data:`jaxdiff.distill.heads.HEAD_FORMS`; ``"dmd2"`` = DMD2's own).
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
    r1_perturb: str = "noised"
    num_time_bins: int = 10
    bin_ema: float = 0.0
    time_bin_coordinate: str = "karras_index"
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
    head_form: str = "jaxdiff"
    num_heads: int = 1
    head_kinds: tuple[str, ...] = ("global_cond",)
    num_groups: int = 1
    heads_per_step: int = 1
    refresh_fraction: float = 0.0
    sigma_data: float = 0.5

    def validate(self) -> None:
        """Raises ValueError naming the bad field and its fix."""
        choices = (
            ("extractor", EXTRACTORS),
            ("r1_perturb", R1_PERTURBS),
            ("time_bin_coordinate", TIME_BIN_COORDINATES),
            ("head_form", HEAD_FORMS),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
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
        step: critic + generator updates done (one per step call).
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


def _check_schedule(critic_steps: int, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: choose one of {SCHEDULES}")
    if critic_steps < (1 if schedule == "dmd2" else 0):
        raise ValueError(
            f"critic_steps={critic_steps} with schedule={schedule!r}: need >= "
            f"{1 if schedule == 'dmd2' else 0}"
        )


def iteration_updates(step: int, critic_steps: int, schedule: str = "alternate") -> tuple[str, ...]:
    """The updates of iteration ``step`` (0-based), in order: ``"generator"``, ``"critic"``.

    Both schedules make ``critic_steps`` critic updates (fake score and discriminator) per
    generator update:

    * ``"alternate"`` (jaxdiff's default; FastGen's, whose ``student_update_freq`` is
      ``critic_steps + 1``): a cycle of ``critic_steps + 1`` iterations, the first
      ``critic_steps`` update the critic, the last one the generator only;
    * ``"dmd2"`` (DMD2's ``train_edm.py``, whose ``dfake_gen_update_ratio`` is
      ``critic_steps``): every iteration updates the critic, and every
      ``critic_steps``-th (``step % critic_steps == 0``) first updates the generator.

    Raises:
        ValueError: for an unknown schedule or too few ``critic_steps``.
    """
    _check_schedule(critic_steps, schedule)
    if schedule == "dmd2":
        return ("generator", "critic") if step % critic_steps == 0 else ("critic",)
    return ("generator",) if step % (critic_steps + 1) == critic_steps else ("critic",)


def generator_updates_before(step: int, critic_steps: int, schedule: str = "alternate") -> int:
    """Generator updates made by iterations ``0..step-1`` under :func:`iteration_updates`."""
    _check_schedule(critic_steps, schedule)
    if schedule == "dmd2":
        return -(-step // critic_steps)
    return step // (critic_steps + 1)


def is_generator_step(step: int, critic_steps: int, schedule: str = "alternate") -> bool:
    """Whether iteration ``step`` updates the generator (:func:`iteration_updates`)."""
    return "generator" in iteration_updates(step, critic_steps, schedule)


def init_distill_state(
    gen_params: Any,
    fake_params: Any,
    pool_params: Any,
    txs: tuple[optax.GradientTransformation, ...],
    cfg: FDistillConfig,
    ema_rates: tuple[float, ...] = (),
) -> DistillState:
    """Builds the initial state; the three param trees are copied (no aliasing).

    ``txs[2]`` is the optimizer of one discriminator head; the pool runs it per head
    (:func:`jaxdiff.distill.pool.per_head`).
    """
    from jaxdiff.training.state import create_train_state

    tx_gen, tx_fake, tx_disc = txs
    tx_disc = pool_lib.per_head(tx_disc)
    return DistillState(
        step=jnp.zeros((), jnp.int32),
        gen=create_train_state(copy_tree(gen_params), tx_gen, ema_rates),
        fake=create_train_state(copy_tree(fake_params), tx_fake, ()),
        disc=create_train_state(copy_tree(pool_params), tx_disc, ()),
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
    ``txs[2]`` is one head's optimizer, run per head as in :func:`init_distill_state`.
    """
    cfg.validate()
    tx_gen, tx_fake, tx_disc = txs
    tx_disc = pool_lib.per_head(tx_disc)
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


def distill_state_shardings(
    abstract: DistillState, p_shard: Any, txs: tuple, mesh: Mesh
) -> DistillState:
    """Shardings of a DistillState.

    Generator and fake score follow the model's ``p_shard``; the (small) discriminator
    pool and its per-head optimizer state are replicated.
    """
    rep = replicated(mesh)
    replicate = lambda tree: jax.tree.map(lambda _: rep, tree)  # noqa: E731
    disc = abstract.disc
    return DistillState(
        step=rep,
        gen=train_state_shardings(abstract.gen, p_shard, txs[0], mesh),
        fake=train_state_shardings(abstract.fake, p_shard, txs[1], mesh),
        disc=TrainState(
            step=rep,
            params=replicate(disc.params),
            ema={k: replicate(disc.params) for k in disc.ema},
            opt_state=replicate(disc.opt_state),
        ),
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
    "R1_PERTURBS",
    "SCHEDULES",
    "DistillState",
    "FDistillConfig",
    "Nets",
    "critic_loss",
    "distill_state_shardings",
    "generate",
    "generator_loss",
    "generator_updates_before",
    "init_distill_state",
    "is_generator_step",
    "iteration_updates",
    "jit_steps",
    "make_steps",
    "sigma_of_t",
    "train_state_shardings",
]
