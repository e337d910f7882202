"""Consistency distillation (CD), consistency training (ECT) and multistep consistency sampling.

The student is a consistency function ``f_theta(x, sigma)`` built on the teacher's network
and formulation by :class:`~jaxdiff.distill.consistency_core.ConsistencyFormulation`
(Song et al.'s ``c_skip``/``c_out``: ``f(x, sigma_min) = x`` by construction), started from
the teacher's weights. Network functions are raw applies,
``apply(params, x_in, noise_label, cond) -> F`` (``model.apply({"params": p}, ...)``); the
formulation wraps them (``D`` is affine in ``F``: a CFG teacher is an apply mixing ``F``s).

* **CD** (Song et al. 2023): ``N`` Karras levels ``sigma_min = s_1 < ... < s_N = sigma_max``;
  per sample draw ``n``, noise ``x_{n+1} = x0 + s_{n+1} eps``, take one teacher ODE step to
  ``s_n`` with any deterministic jaxdiff solver, and pull ``f_theta(x_{n+1}, s_{n+1})``
  towards ``f_target(x^_n, s_n)``; the target params are an EMA of the student's
  (``target_ema``; 0 = iCT's stop-gradient of the current params).
* **CT** (ECT, Geng et al. 2024, "Consistency models made easy"): no teacher; ``t`` is
  log-normal, ``r = ect_r(t, stage)`` with the gap ``t - r`` shrinking by ``q`` every
  ``stage_length`` steps, target ``sg f_theta(x0 + r eps, r)`` from the same ``x0`` and
  ``eps``, pseudo-Huber distance and weight ``1 / (t - r)``.
* **Sampling** (Song et al., Algorithm 1): ``x0 = f(sigma_0 z, sigma_0)``, then for each
  next level ``x = x0 + sqrt(sigma_k^2 - sigma_min^2) eps``, ``x0 = f(x, sigma_k)``. With
  ``sigma_min = 0`` this is :func:`jaxdiff.distill.few_step.few_step_sample`'s loop.
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

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.diffusion.formulation import Formulation
from jaxdiff.distill.consistency_core import (
    MAPPINGS,
    METRICS,
    WEIGHTINGS,
    ConsistencyFormulation,
    NetApply,
    cd_loss,
    check_choice,
    ct_loss,
    ect_r,
    ect_stage,
    multistep_sample,
    sample_consistency,
    student_fn,
)
from jaxdiff.parallel import replicated
from jaxdiff.samplers import Solver, get_solver
from jaxdiff.training.state import (
    TrainState,
    apply_gradients,
    copy_tree,
    create_train_state,
    train_state_shardings,
)


@dataclasses.dataclass(frozen=True)
class CDConfig:
    """Consistency distillation's knobs (Song et al. 2023's CIFAR-10 defaults, L2 metric).

    Attributes:
        num_levels: ``N`` Karras levels of the discretisation.
        sigma_min: the boundary level ``s_1`` (> 0).
        sigma_max: the top level ``s_N``.
        rho: Karras warping.
        sigma_data: data std of the consistency scalings.
        solver: the teacher's ODE step: a deterministic solver name of
            :data:`jaxdiff.samplers.SOLVERS` or a :class:`~jaxdiff.samplers.Solver`.
        metric: ``"l2"`` or ``"pseudo_huber"`` (:data:`METRICS`).
        huber_c: pseudo-Huber ``c`` (None = iCT's ``0.00054 sqrt(dim)``).
        weighting: ``"uniform"`` (Song et al.) or ``"inverse_dt"`` (``1/(s_{n+1} - s_n)``).
        target_ema: EMA rate ``mu`` of the target params (0.95 in Song et al.; 0 = the
            current params under a stop-gradient, as in iCT).
    """

    num_levels: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    solver: str | Solver = "heun"
    metric: str = "l2"
    huber_c: float | None = None
    weighting: str = "uniform"
    target_ema: float = 0.95

    def __post_init__(self) -> None:
        if self.num_levels < 2:
            raise ValueError(f"num_levels must be >= 2 (one level pair), got {self.num_levels}")
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )
        check_choice("metric", self.metric, METRICS)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        if not 0.0 <= self.target_ema < 1.0:
            raise ValueError(f"target_ema must lie in [0, 1), got {self.target_ema}")
        if self.teacher_solver().stochastic:
            raise ValueError(
                f"solver={self.solver!r} is stochastic: CD follows the probability-flow ODE; "
                "use euler, heun or dpmpp_2m"
            )

    def teacher_solver(self) -> Solver:
        """The solver instance of the teacher's ODE step."""
        return get_solver(self.solver) if isinstance(self.solver, str) else self.solver

    def levels(self) -> np.ndarray:
        """The ``N`` ascending Karras levels ``s_1 = sigma_min, ..., s_N = sigma_max``."""
        grid = karras_sigmas(self.num_levels, self.sigma_min, self.sigma_max, self.rho, False)
        return np.ascontiguousarray(grid[::-1])


@dataclasses.dataclass(frozen=True)
class CTConfig:
    """ECT's knobs (locuslab/ect's CIFAR-10 defaults unless noted).

    Attributes:
        sigma_min: the boundary level (0 as in ECT: ``f`` is then EDM's denoiser exactly).
        sigma_max: the one-step sampling level (ECT's ``t_max = 80``).
        sigma_data: data std of the consistency scalings.
        p_mean: mean of ``log t`` (ECT: -1.1).
        p_std: std of ``log t`` (ECT: 2.0).
        q: the gap ``t - r`` shrinks by ``q`` every stage (ECT: 2).
        stage_length: training steps per stage (ECT's CIFAR-10 run: 25,000 = 250 ticks of
            100 iterations; pick about ``num_steps / 8`` for a short run).
        mapping: ``"sigmoid"`` (ECT's default) or ``"const"`` (:func:`ect_r`).
        k: the sigmoid mapping's ``k`` (8).
        b: the sigmoid mapping's ``b`` (1).
        metric: ``"pseudo_huber"`` (ECT) or ``"l2"``.
        huber_c: pseudo-Huber ``c``; None = iCT's ``0.00054 sqrt(dim)`` (ECT's CIFAR-10
            script uses 0, the plain L2 norm).
        weighting: ``"inverse_dt"`` (ECT's ``1 / (t - r)``) or ``"uniform"``.
    """

    sigma_min: float = 0.0
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    p_mean: float = -1.1
    p_std: float = 2.0
    q: float = 2.0
    stage_length: int = 1000
    mapping: str = "sigmoid"
    k: float = 8.0
    b: float = 1.0
    metric: str = "pseudo_huber"
    huber_c: float | None = None
    weighting: str = "inverse_dt"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sigma_min < self.sigma_max:
            raise ValueError(
                f"need 0 <= sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )
        if self.q <= 1.0:
            raise ValueError(f"q must be > 1 (the gap shrinks by q per stage), got {self.q}")
        if self.stage_length < 1:
            raise ValueError(f"stage_length must be >= 1 step, got {self.stage_length}")
        if self.p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {self.p_std}")
        check_choice("mapping", self.mapping, MAPPINGS)
        check_choice("metric", self.metric, METRICS)
        check_choice("weighting", self.weighting, WEIGHTINGS)


@flax.struct.dataclass
class CDState:
    """A CD run's state (the teacher's params are passed separately).

    Attributes:
        step: updates done.
        gen: the student's params, EMA copies (for evaluation) and optax state.
        target: the target params ``theta^-`` (EMA of the student at rate ``target_ema``).
    """

    step: jax.Array
    gen: TrainState
    target: Any


@flax.struct.dataclass
class CTState:
    """A CT run's state: ``step`` (updates done, sets the ECT stage) and the student ``gen``."""

    step: jax.Array
    gen: TrainState


def init_cd_state(
    key: jax.Array,
    student_params: Any,
    tx: optax.GradientTransformation,
    cfg: CDConfig,
    ema_rates: Sequence[float] = (),
) -> CDState:
    """The initial CD state: student and target both copy ``student_params`` (the teacher's)."""
    del key, cfg  # deterministic: the student starts from the given weights
    return CDState(
        step=jnp.zeros((), jnp.int32),
        gen=create_train_state(copy_tree(student_params), tx, tuple(ema_rates)),
        target=copy_tree(student_params),
    )


def make_cd_loss(
    apply_student: NetApply, apply_teacher: NetApply, formulation: Formulation, cfg: CDConfig
) -> Callable:
    """``loss(params, target_params, teacher_params, batch, key) -> (loss, metrics)``."""
    f_of = student_fn(apply_student, formulation, cfg.sigma_min, cfg.sigma_data)
    solver = cfg.teacher_solver()
    levels = jnp.asarray(cfg.levels())

    def loss_fn(params, target_params, teacher_params, batch, key):
        x0 = jnp.asarray(batch["image"], jnp.float32)
        cond = batch.get("label")
        k_n, k_eps = jax.random.split(key)
        n = jax.random.randint(k_n, x0.shape[:1], 0, cfg.num_levels - 1)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)

        def teacher_net(x_in, noise_label, c):
            return apply_teacher(teacher_params, x_in, noise_label, c)

        loss, metrics = cd_loss(
            f_of(params),
            f_of(target_params),
            formulation.as_denoiser(teacher_net),
            solver,
            x0,
            eps,
            levels[n + 1],
            levels[n],
            cond,
            metric=cfg.metric,
            huber_c=cfg.huber_c,
            weighting=cfg.weighting,
        )
        return loss, metrics

    return loss_fn


def make_cd_step(
    apply_student: NetApply,
    apply_teacher: NetApply,
    formulation: Formulation,
    cfg: CDConfig,
    tx: optax.GradientTransformation,
    *,
    ema_warmup: bool = True,
) -> Callable:
    """The pure CD step ``step(state, teacher_params, batch, key) -> (state, metrics)``.

    ``key`` is the run's base key (the step is folded in). After the optimizer update the
    target moves to ``mu target + (1 - mu) params``.
    """
    loss_fn = make_cd_loss(apply_student, apply_teacher, formulation, cfg)
    mu = cfg.target_ema

    def step(state: CDState, teacher_params, batch, key):
        k = jax.random.fold_in(key, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.gen.params, state.target, teacher_params, batch, k)
        gen = apply_gradients(state.gen, grads, tx, ema_warmup)
        target = jax.tree.map(lambda t, p: mu * t + (1.0 - mu) * p, state.target, gen.params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return state.replace(step=state.step + 1, gen=gen, target=target), metrics

    return step


def init_ct_state(
    key: jax.Array,
    student_params: Any,
    tx: optax.GradientTransformation,
    cfg: CTConfig,
    ema_rates: Sequence[float] = (),
) -> CTState:
    """The initial CT state (ECT tunes a pretrained diffusion model: pass its weights)."""
    del key, cfg
    return CTState(
        step=jnp.zeros((), jnp.int32),
        gen=create_train_state(copy_tree(student_params), tx, tuple(ema_rates)),
    )


def make_ct_loss(apply_student: NetApply, formulation: Formulation, cfg: CTConfig) -> Callable:
    """``loss(params, batch, key, stage) -> (loss, metrics)`` of ECT."""
    f_of = student_fn(apply_student, formulation, cfg.sigma_min, cfg.sigma_data)

    def loss_fn(params, batch, key, stage):
        x0 = jnp.asarray(batch["image"], jnp.float32)
        k_t, k_eps = jax.random.split(key)
        z = jax.random.normal(k_t, x0.shape[:1], jnp.float32)
        t = jnp.maximum(jnp.exp(cfg.p_mean + cfg.p_std * z), cfg.sigma_min)
        r = ect_r(t, stage, q=cfg.q, mapping=cfg.mapping, k=cfg.k, b=cfg.b, sigma_min=cfg.sigma_min)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        return ct_loss(
            f_of(params),
            x0,
            eps,
            t,
            r,
            batch.get("label"),
            sigma_min=cfg.sigma_min,
            metric=cfg.metric,
            huber_c=cfg.huber_c,
            weighting=cfg.weighting,
        )

    return loss_fn


def make_ct_step(
    apply_student: NetApply,
    apply_teacher: NetApply | None,
    formulation: Formulation,
    cfg: CTConfig,
    tx: optax.GradientTransformation,
    *,
    ema_warmup: bool = True,
) -> Callable:
    """The pure ECT step ``step(state, teacher_params, batch, key) -> (state, metrics)``.

    CT has no teacher: ``apply_teacher`` and ``teacher_params`` are accepted for the
    driver's uniform signature and ignored. The stage comes from ``state.step``.
    """
    del apply_teacher
    loss_fn = make_ct_loss(apply_student, formulation, cfg)

    def step(state: CTState, teacher_params, batch, key):
        del teacher_params
        k = jax.random.fold_in(key, state.step)
        stage = ect_stage(state.step, cfg.stage_length)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.gen.params, batch, k, stage)
        gen = apply_gradients(state.gen, grads, tx, ema_warmup)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["stage"] = stage.astype(jnp.float32)
        return state.replace(step=state.step + 1, gen=gen), metrics

    return step


def consistency_state_shardings(
    abstract: CDState | CTState, p_shard: Any, tx: optax.GradientTransformation, mesh: Mesh
) -> CDState | CTState:
    """Shardings of a CD/CT state: params-shaped leaves follow ``p_shard``, the rest replicated."""
    gen = train_state_shardings(abstract.gen, p_shard, tx, mesh)
    if isinstance(abstract, CDState):
        return CDState(step=replicated(mesh), gen=gen, target=p_shard)
    return CTState(step=replicated(mesh), gen=gen)


sample_cd = sample_consistency
"""How a CD student samples: :func:`~jaxdiff.distill.consistency_core.sample_consistency`."""
sample_ct = sample_consistency
"""How a CT student samples: :func:`~jaxdiff.distill.consistency_core.sample_consistency`."""


__all__ = [
    "CDConfig",
    "CDState",
    "CTConfig",
    "CTState",
    "ConsistencyFormulation",
    "consistency_state_shardings",
    "ect_r",
    "ect_stage",
    "init_cd_state",
    "init_ct_state",
    "make_cd_loss",
    "make_cd_step",
    "make_ct_loss",
    "make_ct_step",
    "multistep_sample",
    "sample_cd",
    "sample_consistency",
    "sample_ct",
    "student_fn",
]
