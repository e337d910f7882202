"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512), in EDM sigma space.

Each round halves the number of sampling steps: a student started from the teacher's
weights learns to take in one deterministic Euler (DDIM) step what the teacher takes in
two; the trained student becomes the next round's teacher. Student and teacher share
the network (round 0's teacher is the original model, whose weights also start the
student), so the teacher of every round lives in :class:`ProgressiveState` and the
driver's ``apply_teacher``/``teacher_params`` are not used.

**Grids.** The levels are ``s(u) = (smax^(1/rho) + u (smin^(1/rho) - smax^(1/rho)))^rho``
at ``u = i / N``, ``i = 0..N-1``, then a final 0 (:func:`progressive_sigmas`). Unlike EDM's
Karras grid they are nested: the ``N``-step grid is every other level of the ``2N``-step
grid, so a round's student steps land exactly on its teacher's levels.

**Loss** (Algorithm 2): in a round whose teacher takes ``T`` steps (the student ``N =
T/2``), draw ``i`` in ``[0, N)`` per sample, ``s, s', s''`` = levels ``2i, 2i+1, 2i+2`` of
the ``T`` grid, ``x = x0 + s eps``; two teacher Euler steps ``x -> x' -> x''`` with
``x' = D + (s'/s)(x - D)`` (Euler of the PF-ODE = DDIM in EDM space); the target
``x~ = (x'' - (s''/s) x) / (1 - s''/s)`` is the denoiser output with which one student
Euler step from ``x`` lands on ``x''`` (``x~ = x''`` when ``s'' = 0``); the loss is
``mean ((D_student(x, s) - x~) / c_out(s))^2``.

For an EDM formulation this is Salimans & Ho's v-prediction loss: with
``alpha = sd / sqrt(s^2 + sd^2)``, ``sigma_t = s / sqrt(s^2 + sd^2)`` and data scaled by
``1/sd`` (``z = alpha x / sd``), ``D = c_skip x - c_out v``, i.e. the network's ``F`` is
exactly ``-v``, and ``(D - x~) / c_out = v_target - v_hat``: their "SNR+1"-weighted loss
``(1 + alpha^2 / sigma_t^2) ||(D - x~) / sd||^2``. No guidance is applied; the class label
(``batch["label"]``) conditions teacher and student alike.

**Schedule.** Round ``r`` runs steps ``[r K, (r + 1) K)`` (``K = steps_per_round``) with a
``start_steps / 2^r``-step teacher; training past the last round continues the last
round. A new round replaces the teacher by the student (or its EMA) and, by default,
restarts the optimizer and the EMA copies from the student, inside the same compiled step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.typing import ArrayLike

from jaxdiff.diffusion.formulation import Cond, Denoiser, Formulation, expand_to
from jaxdiff.parallel import replicated
from jaxdiff.training.state import (
    TrainState,
    apply_gradients,
    copy_tree,
    create_train_state,
    train_state_shardings,
)

NetApply = Callable[..., jax.Array]
"""``apply(params, x_in, noise_label, cond) -> F``: the raw network (student = teacher's)."""


def _check_grid(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> None:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")


def progressive_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> np.ndarray:
    """The nested ``num_steps``-step grid: ``s(i / N)`` for ``i < N``, then 0.

    ``progressive_sigmas(2N)[::2] == progressive_sigmas(N)`` exactly: ``2j / 2N`` and
    ``j / N`` are the same float64 quotient.

    Args:
        num_steps: ``N`` Euler steps.
        sigma_min: the level at ``u = 1`` (never reached: the last step jumps to 0).
        sigma_max: the first level.
        rho: Karras warping.

    Returns:
        float32 ``[N + 1]``, decreasing, ``[sigma_max, ..., 0]``.

    Raises:
        ValueError: on ``N < 1`` or a bad range.
    """
    _check_grid(num_steps, sigma_min, sigma_max, rho)
    u = np.arange(num_steps, dtype=np.float64) / float(num_steps)
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return np.append((hi + u * (lo - hi)) ** rho, 0.0).astype(np.float32)


def progressive_levels(
    index: ArrayLike,
    num_steps: ArrayLike,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> jax.Array:
    """Levels ``index`` of :func:`progressive_sigmas` ``(num_steps)``, both may be traced.

    ``index`` in ``[0, N]`` (``N`` gives the final 0); float32, shaped like ``index``.
    """
    index = jnp.asarray(index, jnp.int32)
    n = jnp.asarray(num_steps, jnp.int32)
    u = index.astype(jnp.float32) / n.astype(jnp.float32)
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    level = (hi + u * (lo - hi)) ** rho
    return jnp.where(index >= n, 0.0, level).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ProgressiveConfig:
    """Progressive distillation's knobs (hashable: closed over by the jitted step).

    Attributes:
        start_steps: ``N0``, the original teacher's Euler steps on the nested grid
            (Salimans & Ho start from 1024 or 8192; a power of two such as 16 here).
        rounds: ``R`` halvings; round ``r``'s student takes ``N0 / 2^(r + 1)`` steps, the
            final student ``N0 / 2^R`` (:attr:`final_steps`).
        steps_per_round: training steps per round.
        sigma_min: the grid's ``u = 1`` level (the teacher's sampling range).
        sigma_max: the first level (sampling starts at ``sigma_max * noise``).
        rho: the grid's warping.
        teacher_from_ema: the next round's teacher is the student's EMA (the copy whose
            key sorts first, the run's only one usually) instead of its raw params.
        reset_optimizer: each round's student starts with a fresh optimizer state
            (Salimans & Ho); False keeps the moments and the step count. A fresh state
            also restarts any learning-rate schedule inside ``tx`` (its warm-up included).
        reset_ema: each round restarts the EMA copies from the student's params, so the
            evaluated EMA holds no weights of the previous round's (twice as many step)
            student.
    """

    start_steps: int = 16
    rounds: int = 4
    steps_per_round: int = 1000
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    teacher_from_ema: bool = False
    reset_optimizer: bool = True
    reset_ema: bool = True

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1 (one halving), got {self.rounds}")
        if self.start_steps < 2 or self.start_steps % 2**self.rounds:
            raise ValueError(
                f"start_steps={self.start_steps} must be a multiple of 2^rounds = "
                f"{2**self.rounds} so every round halves it exactly: use a power of two "
                f">= {2**self.rounds} (e.g. 16 with rounds <= 4)"
            )
        if self.steps_per_round < 1:
            raise ValueError(f"steps_per_round must be >= 1, got {self.steps_per_round}")
        _check_grid(self.start_steps, self.sigma_min, self.sigma_max, self.rho)

    @property
    def final_steps(self) -> int:
        """The last round's student steps, ``start_steps / 2^rounds``."""
        return self.start_steps // 2**self.rounds

    def sigmas(self, num_steps: int | None = None) -> np.ndarray:
        """The nested grid of ``num_steps`` (default :attr:`final_steps`) Euler steps."""
        n = self.final_steps if num_steps is None else num_steps
        return progressive_sigmas(n, self.sigma_min, self.sigma_max, self.rho)


@flax.struct.dataclass
class ProgressiveState:
    """A progressive-distillation run's state.

    Attributes:
        step: updates done (sets the round).
        gen: the student's params, EMA copies and optax state.
        teacher: the current round's teacher params (the same network as the student).
    """

    step: jax.Array
    gen: TrainState
    teacher: Any


def init_progressive_state(
    key: jax.Array,
    student_params: Any,
    tx: optax.GradientTransformation,
    cfg: ProgressiveConfig,
    ema_rates: Sequence[float] = (),
) -> ProgressiveState:
    """The initial state: student and round 0's teacher both copy ``student_params``.

    Raises:
        ValueError: ``teacher_from_ema`` without an EMA rate.
    """
    del key  # deterministic: the student starts from the teacher's weights
    if cfg.teacher_from_ema and not ema_rates:
        raise ValueError("teacher_from_ema=True needs an EMA: pass ema_rates, e.g. (0.999,)")
    return ProgressiveState(
        step=jnp.zeros((), jnp.int32),
        gen=create_train_state(copy_tree(student_params), tx, tuple(ema_rates)),
        teacher=copy_tree(student_params),
    )


def progressive_round(step: ArrayLike, cfg: ProgressiveConfig) -> jax.Array:
    """The round of training step ``step``: ``min(step // steps_per_round, rounds - 1)``."""
    step = jnp.asarray(step, jnp.int32)
    return jnp.minimum(step // cfg.steps_per_round, cfg.rounds - 1)


def round_steps(round_index: ArrayLike, cfg: ProgressiveConfig) -> jax.Array:
    """The TEACHER's steps in round ``round_index``: ``start_steps / 2^round``."""
    return jnp.right_shift(jnp.int32(cfg.start_steps), jnp.asarray(round_index, jnp.int32))


def student_steps(round_index: ArrayLike, cfg: ProgressiveConfig) -> jax.Array:
    """The student's steps in round ``round_index``: half the teacher's."""
    return round_steps(round_index, cfg) // 2


def euler_step(den: Denoiser, x: jax.Array, s: ArrayLike, s_next: ArrayLike, cond: Cond):
    """One Euler (DDIM) step ``D + (s_next / s)(x - D)`` of the PF-ODE, ``s > 0``."""
    s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), x.shape[:1])
    d = den(x, s, cond)
    return d + expand_to(s_next / s, x) * (x - d)


def progressive_target(
    teacher: Denoiser,
    x: jax.Array,
    s: jax.Array,
    s_mid: jax.Array,
    s_next: jax.Array,
    cond: Cond = None,
) -> jax.Array:
    """The target ``x~``: one student Euler step with it lands on two teacher steps' end.

    Two teacher Euler steps ``s -> s_mid -> s_next`` take ``x`` to ``x''``; the returned
    ``(x'' - (s_next/s) x) / (1 - s_next/s)`` is the denoiser value whose single Euler step
    ``s -> s_next`` from ``x`` lands on ``x''``. All levels ``[B]``, ``s > s_mid > s_next``.
    """
    x2 = euler_step(teacher, euler_step(teacher, x, s, s_mid, cond), s_mid, s_next, cond)
    ratio = expand_to(s_next / s, x)
    return (x2 - ratio * x) / (1.0 - ratio)


def progressive_loss(
    student: Denoiser,
    teacher: Denoiser,
    formulation: Formulation,
    x0: jax.Array,
    eps: jax.Array,
    s: jax.Array,
    s_mid: jax.Array,
    s_next: jax.Array,
    cond: Cond = None,
) -> jax.Array:
    """``mean_b mean_pixels(((D_student(x, s) - sg x~) / c_out(s))^2)``, ``x = x0 + s eps``."""
    x = x0 + expand_to(s, x0) * eps
    target = jax.lax.stop_gradient(progressive_target(teacher, x, s, s_mid, s_next, cond))
    c_out = expand_to(formulation.precondition(s).c_out, x)
    err = ((student(x, s, cond) - target) / c_out) ** 2
    return jnp.mean(jnp.mean(err.reshape(err.shape[0], -1), axis=1))


def draw_levels(
    key: jax.Array, shape: tuple[int, ...], round_index: ArrayLike, cfg: ProgressiveConfig
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(s, s_mid, s_next, eps)`` of a batch of ``shape`` (``i`` uniform per sample)."""
    k_i, k_eps = jax.random.split(key)
    teacher_n = round_steps(round_index, cfg)
    i = jax.random.randint(k_i, shape[:1], 0, teacher_n // 2)
    grid = dict(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)
    s, s_mid, s_next = (progressive_levels(2 * i + j, teacher_n, **grid) for j in range(3))
    return s, s_mid, s_next, jax.random.normal(k_eps, shape, jnp.float32)


def _begin_round(gen: TrainState, teacher: Any, cfg: ProgressiveConfig, tx) -> tuple:
    """The switch to a new round: teacher <- student (or its EMA), fresh optimizer/EMA."""
    source = gen.ema[sorted(gen.ema)[0]] if cfg.teacher_from_ema else gen.params
    teacher = jax.tree.map(lambda p, t: p.astype(t.dtype), source, teacher)
    opt_state = tx.init(gen.params) if cfg.reset_optimizer else gen.opt_state
    ema = {k: gen.params for k in gen.ema} if cfg.reset_ema else gen.ema
    return gen.replace(opt_state=opt_state, ema=ema), teacher


def make_progressive_step(
    apply_student: NetApply,
    apply_teacher: NetApply | None,
    formulation: Formulation,
    cfg: ProgressiveConfig,
    tx: optax.GradientTransformation,
    *,
    ema_warmup: bool = True,
) -> Callable:
    """The pure step ``step(state, teacher_params, batch, key) -> (state, metrics)``.

    The teacher of every round is ``apply_student`` on ``state.teacher`` (progressive
    distillation's teacher and student share the network); ``apply_teacher`` and
    ``teacher_params`` are accepted for the drivers' uniform signature and ignored. ``key``
    is the run's base key (the step is folded in).

    Args:
        apply_student: the raw network ``apply(params, x_in, noise_label, cond) -> F``.
        apply_teacher: ignored.
        formulation: the network's formulation (the teacher's).
        cfg: the config.
        tx: the optimizer.
        ema_warmup: EMA warm-up of the student's EMA copies.

    Metrics: ``loss``, ``grad_norm``, ``round`` and ``student_steps`` (float32).
    """
    del apply_teacher

    def den_of(params):
        return formulation.as_denoiser(lambda x, c, cond: apply_student(params, x, c, cond))

    def step(state: ProgressiveState, teacher_params, batch, key):
        del teacher_params
        k = state.step
        new_round = (
            (k > 0) & (k % cfg.steps_per_round == 0) & (k // cfg.steps_per_round < cfg.rounds)
        )
        gen, teacher = jax.lax.cond(
            new_round,
            lambda g, t: _begin_round(g, t, cfg, tx),
            lambda g, t: (g, t),
            state.gen,
            state.teacher,
        )
        round_index = progressive_round(k, cfg)
        x0 = jnp.asarray(batch["image"], jnp.float32)
        cond = batch.get("label")
        s, s_mid, s_next, eps = draw_levels(jax.random.fold_in(key, k), x0.shape, round_index, cfg)
        teacher_den = den_of(teacher)

        def loss_fn(params):
            return progressive_loss(
                den_of(params), teacher_den, formulation, x0, eps, s, s_mid, s_next, cond
            )

        loss, grads = jax.value_and_grad(loss_fn)(gen.params)
        gen = apply_gradients(gen, grads, tx, ema_warmup)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "round": round_index.astype(jnp.float32),
            "student_steps": student_steps(round_index, cfg).astype(jnp.float32),
        }
        return state.replace(step=k + 1, gen=gen, teacher=teacher), metrics

    return step


def sample_progressive(
    apply_student: NetApply,
    params: Any,
    noise: jax.Array,
    cond: Cond,
    formulation: Formulation,
    cfg: ProgressiveConfig,
    key: jax.Array | None = None,
    *,
    num_steps: int | None = None,
) -> jax.Array:
    """How the student samples: Euler over ``cfg.sigmas(num_steps)`` from ``sigma_max noise``.

    Deterministic (``key`` is unused; kept for the common ``sample_<method>`` signature).
    The standard sampler reproduces it: ``jaxdiff.samplers.sample(den, noise,
    cfg.sigmas(), solver=get_solver("euler"))``, to float rounding.

    Args:
        apply_student: the raw network.
        params: its params (e.g. an EMA copy).
        noise: ``[B, ...]`` unit Gaussian noise.
        cond: conditioning or None.
        formulation: the network's formulation.
        cfg: the config it was trained with.
        key: unused.
        num_steps: steps on the nested grid (default :attr:`ProgressiveConfig.final_steps`).

    Returns:
        ``[B, ...]`` float32 samples.
    """
    del key
    sigmas = jnp.asarray(cfg.sigmas(num_steps))
    den = formulation.as_denoiser(lambda x, c, cd: apply_student(params, x, c, cd))

    def body(x, pair):
        return euler_step(den, x, pair[0], pair[1], cond), None

    x = jnp.asarray(noise, jnp.float32) * sigmas[0]
    x, _ = jax.lax.scan(body, x, (sigmas[:-1], sigmas[1:]))
    return x


def progressive_state_shardings(
    abstract: ProgressiveState, p_shard: Any, tx: optax.GradientTransformation, mesh: Mesh
) -> ProgressiveState:
    """Shardings of a state: params-shaped leaves (teacher too) follow ``p_shard``."""
    return ProgressiveState(
        step=replicated(mesh),
        gen=train_state_shardings(abstract.gen, p_shard, tx, mesh),
        teacher=p_shard,
    )


__all__ = [
    "ProgressiveConfig",
    "ProgressiveState",
    "draw_levels",
    "euler_step",
    "init_progressive_state",
    "make_progressive_step",
    "progressive_levels",
    "progressive_loss",
    "progressive_round",
    "progressive_sigmas",
    "progressive_state_shardings",
    "progressive_target",
    "round_steps",
    "sample_progressive",
    "student_steps",
]
