"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447).

Rectified flow ``z_t = (1 - t) x + t eps`` (data at ``t = 0``, noise at 1) with conditional
velocity ``v = eps - x``. The network models the *average* velocity over ``[r, t]``,

    u(z_t, r, t) = (z_t - z_r) / (t - r) = 1/(t - r) int_r^t v(z_s, s) ds   (u(z, t, t) = v),

so one evaluation jumps ``z_r = z_t - (t - r) u(z_t, r, t)``. Differentiating
``(t - r) u = int_r^t v`` in ``t`` gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),

with the total derivative ``d/dt u = v . d_z u + d_t u`` (``dr/dt = 0``): one ``jax.jvp`` of
``u(z, r, t)`` along the tangent ``(v, 0, 1)``. The loss regresses ``u_theta`` on the
stop-gradient target ``u_tgt = v - (t - r) d/dt u_theta-``, with the paper's adaptive
weight ``sg(1 / (||delta||^2 + c)^p)`` on ``||delta||^2 = ||u_theta - u_tgt||^2`` (summed
over the sample, as in the paper; ``error_reduce="mean"`` averages instead).

``(r, t)``: two draws from the time distribution (logit-normal by default), ``t`` the
larger; a fraction ``1 - ratio_r_neq_t`` of the samples then sets ``r = t`` (plain flow
matching). No classifier-free guidance is folded into training.

The network sees ``(t, t - r)``: ``apply(params, z, label_scale * t, cond,
aux_time=label_scale * (t - r))``, e.g. a UNet/DiT built with ``aux_time_embed=True``.

**From data or from a teacher.** MeanFlow trains from data alone (``velocity="data"``, the
paper; the student can start from scratch). With ``velocity="teacher"`` the conditional
``v`` is replaced by a jaxdiff teacher's marginal velocity ``(z_t - D(z_t/(1-t),
t/(1-t))) / t`` (any formulation's denoiser ``D``), a lower-variance distillation target;
the identity then holds exactly for the teacher's own flow.
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

from jaxdiff.diffusion.conversions import flow_t_to_sigma
from jaxdiff.diffusion.formulation import Denoiser, Formulation, expand_to
from jaxdiff.training.state import TrainState, apply_gradients, copy_tree, create_train_state

NetApply = Callable[..., jax.Array]
"""``apply(params, x_in, noise_label, cond, **kwargs) -> network output``."""

TIME_DISTS = ("logit_normal", "uniform")
VELOCITIES = ("data", "teacher")
ERROR_REDUCES = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class MeanFlowConfig:
    """Knobs of MeanFlow (hashable: closed over by the jitted step).

    Attributes:
        time_dist: ``"logit_normal"`` (``sigmoid(N(logit_mean, logit_std^2))``) or
            ``"uniform"``.
        logit_mean: mean of the logit-normal (paper, ImageNet: -0.4; CIFAR-10: -2.0).
        logit_std: its std (ImageNet: 1.0; CIFAR-10: 2.0).
        ratio_r_neq_t: fraction of samples with ``r != t`` (ImageNet: 0.25; CIFAR: 0.75).
        velocity: ``"data"`` (``eps - x``, the paper) or ``"teacher"`` (see module doc).
        norm_p: power ``p`` of the adaptive weight (ImageNet: 1.0; CIFAR-10: 0.75; 0 = off).
        norm_eps: ``c`` of the adaptive weight.
        error_reduce: ``||delta||^2`` summed (paper) or averaged over a sample's entries.
        label_scale: network labels are ``label_scale * t`` and ``label_scale * (t - r)``.
        teacher_t_range: ``t`` is clipped into it for the teacher's velocity, which
            divides by ``t`` and needs ``t < 1``.
    """

    time_dist: str = "logit_normal"
    logit_mean: float = -0.4
    logit_std: float = 1.0
    ratio_r_neq_t: float = 0.25
    velocity: str = "data"
    norm_p: float = 1.0
    norm_eps: float = 1e-3
    error_reduce: str = "sum"
    label_scale: float = 1.0
    teacher_t_range: tuple[float, float] = (1e-3, 1.0 - 1e-3)

    def __post_init__(self):
        for name, allowed in (
            ("time_dist", TIME_DISTS),
            ("velocity", VELOCITIES),
            ("error_reduce", ERROR_REDUCES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        if not 0.0 <= self.ratio_r_neq_t <= 1.0:
            raise ValueError(f"ratio_r_neq_t={self.ratio_r_neq_t} must lie in [0, 1]")
        if self.logit_std <= 0 or self.norm_eps <= 0 or self.norm_p < 0:
            raise ValueError(
                f"logit_std={self.logit_std} and norm_eps={self.norm_eps} must be > 0 and "
                f"norm_p={self.norm_p} >= 0"
            )
        lo, hi = self.teacher_t_range
        if not 0.0 < lo < hi < 1.0:
            raise ValueError(f"teacher_t_range={self.teacher_t_range} must satisfy 0 < lo < hi < 1")


@flax.struct.dataclass
class MeanFlowState:
    """A MeanFlow run's state.

    Attributes:
        step: updates done.
        gen: the average-velocity network's params, EMA copies and optax state.
    """

    step: jax.Array
    gen: TrainState


def sample_r_t(key: jax.Array, batch: int, cfg: MeanFlowConfig) -> tuple[jax.Array, jax.Array]:
    """``(r, t)``, each ``[batch]``, ``r <= t``; ``r = t`` on a ``1 - ratio_r_neq_t`` share."""
    k_pair, k_mask = jax.random.split(key)
    if cfg.time_dist == "uniform":
        pair = jax.random.uniform(k_pair, (2, batch), jnp.float32)
    else:
        normal = jax.random.normal(k_pair, (2, batch), jnp.float32)
        pair = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * normal)
    t, r = jnp.max(pair, axis=0), jnp.min(pair, axis=0)
    distinct = jax.random.bernoulli(k_mask, cfg.ratio_r_neq_t, (batch,))
    return jnp.where(distinct, r, t), t


def average_velocity(
    apply: NetApply, params: Any, z: jax.Array, r: jax.Array, t: jax.Array, cond: Any, scale: float
) -> jax.Array:
    """``u(z, r, t)``: the network on labels ``(scale t, scale (t - r))``."""
    return apply(params, z, scale * t, cond, aux_time=scale * (t - r)).astype(jnp.float32)


def meanflow_target(
    u_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    z: jax.Array,
    r: jax.Array,
    t: jax.Array,
    v: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``(u(z, r, t), u_tgt)`` with ``u_tgt = v - (t - r) du/dt`` from one ``jax.jvp``.

    Args:
        u_fn: ``u_fn(z, r, t) -> u`` (params closed over).
        z: ``[B, ...]`` points ``z_t``.
        r: ``[B]`` interval starts.
        t: ``[B]`` interval ends.
        v: ``[B, ...]`` velocity at ``(z, t)``, the tangent of ``z``.
    """
    u, dudt = jax.jvp(u_fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
    return u, v - expand_to(t - r, z) * dudt


def flow_velocity(denoise: Denoiser, z: jax.Array, t: jax.Array, cond: Any) -> jax.Array:
    """Marginal rectified-flow velocity ``(z_t - D(z_t / (1 - t), t / (1 - t))) / t``.

    ``D`` is any EDM-space denoiser; ``t`` in ``(0, 1)``.
    """
    x0 = denoise(z / expand_to(1.0 - t, z), flow_t_to_sigma(t), cond)
    return (z - x0) / expand_to(t, z)


def denoiser_velocity(net_apply: NetApply, formulation: Formulation) -> NetApply:
    """MeanFlow's ``u`` network read through a denoiser's formulation (label scale 1).

    ``u(z, r, t) = (z - D(z / (1 - t), t / (1 - t); aux_time = t - r)) / t`` with ``D`` the
    ``formulation``'s denoiser around ``net_apply``. A student built from a teacher's
    weights (plus the zero-initialised ``aux_time`` embedding) then starts as the teacher's
    marginal velocity :func:`flow_velocity` for every ``r``, and one MeanFlow jump
    ``z_r = z_t - (t - r) u`` is exactly one Euler (DDIM) step of ``D`` from
    ``sigma_t = t / (1 - t)`` to ``sigma_r``. ``t`` must lie in ``(0, 1)``.

    Args:
        net_apply: ``apply(params, x_in, noise_label, cond, aux_time=...) -> F``.
        formulation: the formulation ``F`` is read under (the teacher's).

    Returns:
        ``apply(params, z, t, cond, aux_time=t - r) -> u``, as :func:`average_velocity` calls it.
    """

    def apply(params, z, t, cond, aux_time=None):
        def net(x_in, noise_label, c):
            return net_apply(params, x_in, noise_label, c, aux_time=aux_time)

        t = jnp.asarray(t, jnp.float32)
        x = z / expand_to(1.0 - t, z)
        x0 = formulation.denoise(net, x, flow_t_to_sigma(t), cond)
        return (z - x0.astype(jnp.float32)) / expand_to(t, z)

    return apply


def adaptive_loss(err: jax.Array, cfg: MeanFlowConfig) -> tuple[jax.Array, jax.Array]:
    """``(mean(sg(w) ||err||^2), mean ||err||^2)`` with ``w = 1 / (||err||^2 + c)^p``."""
    flat = err.reshape(err.shape[0], -1) ** 2
    sq = jnp.sum(flat, axis=1) if cfg.error_reduce == "sum" else jnp.mean(flat, axis=1)
    w = jax.lax.stop_gradient(1.0 / (sq + cfg.norm_eps) ** cfg.norm_p)
    return jnp.mean(w * sq), jnp.mean(sq)


def init_meanflow_state(
    key: jax.Array,
    student_params: Any,
    tx: optax.GradientTransformation,
    cfg: MeanFlowConfig,
    ema_rates: tuple[float, ...] = (),
) -> MeanFlowState:
    """Initial state (``key`` and ``cfg`` are unused: one network, no extra params)."""
    del key, cfg
    return MeanFlowState(
        step=jnp.zeros((), jnp.int32),
        gen=create_train_state(copy_tree(student_params), tx, ema_rates),
    )


def make_meanflow_step(
    apply_student: NetApply,
    apply_teacher: NetApply | None,
    formulation: Formulation | None,
    cfg: MeanFlowConfig,
    tx: optax.GradientTransformation,
    *,
    ema_warmup: bool = True,
) -> Callable:
    """Returns the pure ``step(state, teacher_params, batch, key) -> (state, metrics)``.

    Args:
        apply_student: the raw network, called with ``aux_time=`` (see module doc).
        apply_teacher: the raw teacher network (only ``velocity="teacher"``).
        formulation: the teacher's formulation (only ``velocity="teacher"``).
        cfg: the MeanFlow config.
        tx: the optimizer.
        ema_warmup: EMA warm-up of the EMA copies.

    ``teacher_params`` is ignored with ``velocity="data"``; ``key`` is the run's base key
    (the step is folded in).

    Raises:
        ValueError: ``velocity="teacher"`` without a teacher or formulation.
    """
    if cfg.velocity == "teacher" and (apply_teacher is None or formulation is None):
        raise ValueError("velocity='teacher' needs apply_teacher and formulation; or use 'data'")

    def step(state: MeanFlowState, teacher_params, batch, key):
        k_time, k_eps = jax.random.split(jax.random.fold_in(key, state.step))
        x = batch["image"].astype(jnp.float32)
        cond = batch.get("label")
        r, t = sample_r_t(k_time, x.shape[0], cfg)
        eps = jax.random.normal(k_eps, x.shape, jnp.float32)
        if cfg.velocity == "teacher":
            t_clip = jnp.clip(t, *cfg.teacher_t_range)
            r, t = jnp.where(r >= t, t_clip, jnp.minimum(r, t_clip)), t_clip
        z = expand_to(1.0 - t, x) * x + expand_to(t, x) * eps
        if cfg.velocity == "teacher":

            def net(*args, **kwargs):
                return apply_teacher(teacher_params, *args, **kwargs)

            v = flow_velocity(formulation.as_denoiser(net), z, t, cond)
        else:
            v = eps - x
        v = jax.lax.stop_gradient(v)
        params_minus = jax.lax.stop_gradient(state.gen.params)

        def u_minus(zz, rr, tt):
            return average_velocity(apply_student, params_minus, zz, rr, tt, cond, cfg.label_scale)

        _, u_tgt = meanflow_target(u_minus, z, r, t, v)
        u_tgt = jax.lax.stop_gradient(u_tgt)

        def loss_fn(params):
            u = average_velocity(apply_student, params, z, r, t, cond, cfg.label_scale)
            return adaptive_loss(u - u_tgt, cfg)

        (loss, sq), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.gen.params)
        gen = state.gen
        new_gen = apply_gradients(gen, grads, tx, ema_warmup)
        metrics = {
            "loss": loss,
            "mse": sq,
            "r_neq_t": jnp.mean((r < t).astype(jnp.float32)),
            "grad_norm": optax.tree.norm(grads),
        }
        return state.replace(step=state.step + 1, gen=new_gen), metrics

    return step


def sample_meanflow(
    apply_student: NetApply,
    params: Any,
    noise: jax.Array,
    cond: Any,
    key: jax.Array | None = None,
    *,
    cfg: MeanFlowConfig,
    num_steps: int = 1,
    times: Sequence[float] | None = None,
) -> jax.Array:
    """MeanFlow sampling: ``z_r = z_t - (t - r) u(z_t, r, t)`` from ``z_1 = noise`` to ``t = 0``.

    One step is ``x = eps - u(eps, 0, 1)``. Deterministic (``key`` is unused; kept for the
    common ``sample_<method>`` signature).

    Args:
        apply_student: the raw network.
        params: its params (e.g. an EMA copy).
        noise: ``[B, ...]`` unit Gaussian noise ``eps``.
        cond: conditioning.
        key: unused.
        cfg: the config it was trained with (its ``label_scale``).
        num_steps: equal steps in ``t`` when ``times`` is None.
        times: decreasing times from 1 to 0, e.g. ``(1.0, 0.5, 0.0)``.

    Returns:
        ``[B, ...]`` samples.
    """
    del key
    if times is None:
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        times = np.linspace(1.0, 0.0, num_steps + 1)
    times = [float(s) for s in times]
    if any(a <= b for a, b in zip(times, times[1:], strict=False)) or len(times) < 2:
        raise ValueError(f"times={times} must decrease, with at least two entries")
    z = noise.astype(jnp.float32)
    b = z.shape[0]
    for t, r in zip(times, times[1:], strict=False):
        tb, rb = jnp.full((b,), t, jnp.float32), jnp.full((b,), r, jnp.float32)
        z = z - (t - r) * average_velocity(apply_student, params, z, rb, tb, cond, cfg.label_scale)
    return z


__all__ = [
    "ERROR_REDUCES",
    "TIME_DISTS",
    "VELOCITIES",
    "MeanFlowConfig",
    "MeanFlowState",
    "adaptive_loss",
    "average_velocity",
    "denoiser_velocity",
    "flow_velocity",
    "init_meanflow_state",
    "make_meanflow_step",
    "meanflow_target",
    "sample_meanflow",
    "sample_r_t",
]
