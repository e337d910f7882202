"""sCM: continuous-time consistency models in TrigFlow (Lu & Song 2024, arXiv 2410.11081).

The student is a consistency function in TrigFlow coordinates (:mod:`jaxdiff.distill.trigflow`)

    f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t),

so ``f(x, 0) = x`` holds by construction. Its continuous-time loss needs the total
derivative of ``f_theta-`` (``theta- = stop_gradient(theta)``, no EMA target) along the
PF-ODE, which a single ``jax.jvp`` through the network gives. Following the paper's
rearrangement, with ``dx_t/dt`` the teacher's velocity (sCD, ``mode="distill"``) or the
conditional one ``cos(t) z - sin(t) x0`` (sCT, ``mode="train"``):

    g = -cos^2(t) (sigma_d F- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF-/dt)

(``g = cos(t) df-/dt`` at ``r = 1``), with

* tangent warm-up: ``r = min(1, step / tangent_warmup_steps)``;
* tangent normalisation: ``g <- g / (||g|| + c)``, per sample, ``c = 0.1``;
* loss ``mean_pixels (F_theta - F- - g)^2`` per sample, weighted adaptively: with
  ``weighting="learned"`` (the paper's) a small network ``w(t)`` (:class:`TimeWeight`,
  a log-variance) gives ``exp(-w) mse + w``, so ``exp(w)`` tracks the per-time loss
  scale; ``"uniform"`` is the plain mean.

The JVP's tangents are pre-multiplied by ``cos(t) sin(t)`` (as in the paper), which keeps
the ``"edm"`` noise label's derivative ``1 / (4 sin t cos t)`` bounded. Training times are
``t = arctan(exp(tau) / sigma_d)``, ``tau ~ N(p_mean, p_std^2)``. Networks run without
dropout (the JVP and the forward pass must see the same function).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.diffusion.formulation import Formulation, expand_to
from jaxdiff.distill.trigflow import (
    PARAMETERISATIONS,
    NetApply,
    consistency_fn,
    teacher_velocity,
    trig_from_sigma,
    trig_net,
    trig_noise,
)
from jaxdiff.models.layers import NoiseEmbedding, dense, zeros
from jaxdiff.training.state import TrainState, apply_gradients, copy_tree, create_train_state

MODES = ("distill", "train")
"""``"distill"`` = sCD (teacher velocity), ``"train"`` = sCT (conditional velocity)."""
WEIGHTINGS = ("learned", "uniform")
"""Adaptive loss weighting of sCM (:class:`SCMConfig`)."""
TWO_STEP_TIME = 1.1
"""The paper's intermediate time of two-step sampling."""


@dataclasses.dataclass(frozen=True)
class SCMConfig:
    """Knobs of sCM (hashable: closed over by the jitted step).

    Attributes:
        mode: ``"distill"`` (sCD) or ``"train"`` (sCT), see :data:`MODES`.
        sigma_data: data std ``sigma_d`` (0.5 for images in [-1, 1]).
        p_mean: mean of ``tau = log(sigma_d tan t)`` of training times (paper: -1.0).
        p_std: its std (paper: 1.4).
        parameterisation: how ``F`` is read from the raw student network
            (:func:`jaxdiff.distill.trigflow.trig_net`): ``"edm"`` (an EDM network's exact
            TrigFlow form; initialise from an EDM teacher's weights) or ``"trigflow"``
            (noise label ``label_scale * t``).
        label_scale: time-label scale of the ``"trigflow"`` parameterisation.
        tangent_norm_const: ``c`` of the tangent normalisation ``g / (||g|| + c)``.
        normalize_tangent: apply the normalisation (the paper does).
        tangent_warmup_steps: steps over which ``r`` ramps 0 -> 1 (paper: 10k; 0 = none).
        weighting: ``"learned"`` or ``"uniform"`` (:data:`WEIGHTINGS`).
        weight_features: sinusoidal features / width of :class:`TimeWeight`.
        sigma_max: noise level of one-step sampling (``t_max = arctan(sigma_max / sigma_d)``).
    """

    mode: str = "distill"
    sigma_data: float = 0.5
    p_mean: float = -1.0
    p_std: float = 1.4
    parameterisation: str = "edm"
    label_scale: float = 1.0
    tangent_norm_const: float = 0.1
    normalize_tangent: bool = True
    tangent_warmup_steps: int = 10_000
    weighting: str = "learned"
    weight_features: int = 32
    sigma_max: float = 80.0

    def __post_init__(self):
        choices = (
            ("mode", MODES),
            ("weighting", WEIGHTINGS),
            ("parameterisation", PARAMETERISATIONS),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        if self.sigma_data <= 0 or self.sigma_max <= 0 or self.p_std <= 0:
            raise ValueError(
                f"sigma_data={self.sigma_data}, sigma_max={self.sigma_max} and "
                f"p_std={self.p_std} must all be > 0"
            )
        if self.tangent_norm_const <= 0 and self.normalize_tangent:
            raise ValueError(
                f"tangent_norm_const={self.tangent_norm_const} must be > 0 (paper: 0.1)"
            )
        if self.tangent_warmup_steps < 0:
            raise ValueError(f"tangent_warmup_steps={self.tangent_warmup_steps} must be >= 0")

    @property
    def t_max(self) -> float:
        """TrigFlow time of ``sigma_max``."""
        return float(np.arctan2(self.sigma_max, self.sigma_data))


class TimeWeight(nn.Module):
    """sCM's adaptive weight ``w(t)``: a log-variance per sample from the time alone.

    Sinusoidal embedding of ``log(tan t) / 4`` (``Dense -> SiLU -> Dense``), SiLU, then a
    zero-initialised ``Dense(1)``: ``w = 0`` (uniform weighting) at initialisation.

    Attributes:
        features: embedding features and width.
    """

    features: int = 32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        """``[B]`` times -> ``[B]`` log-variances."""
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
        label = jnp.log(jnp.tan(jnp.clip(t, 1e-6, np.pi / 2 - 1e-6))) / 4.0
        h = NoiseEmbedding(self.features, self.features, name="embed", **kw)(label)
        return dense(1, ("embed", None), kernel_init=zeros, name="out", **kw)(nn.silu(h))[:, 0]


@flax.struct.dataclass
class SCMState:
    """An sCM run's state (the teacher's params are passed to the step separately).

    Attributes:
        step: updates done.
        gen: the student's params, EMA copies and optax state.
        weight: :class:`TimeWeight`'s params and optax state (empty params when
            ``weighting="uniform"``).
    """

    step: jax.Array
    gen: TrainState
    weight: TrainState


def sample_times(key: jax.Array, batch: int, cfg: SCMConfig) -> jax.Array:
    """Training times ``arctan(exp(tau) / sigma_d)``, ``tau ~ N(p_mean, p_std^2)``, ``[batch]``."""
    tau = cfg.p_mean + cfg.p_std * jax.random.normal(key, (batch,), jnp.float32)
    return trig_from_sigma(jnp.exp(tau), cfg.sigma_data)


def student_fn(apply_student: NetApply, cfg: SCMConfig) -> Callable[..., jax.Array]:
    """``F(params, x_t, t, cond)``: the student's TrigFlow network under ``cfg``."""

    def f_net(params, x_t, t, cond):
        return trig_net(
            apply_student,
            params,
            x_t,
            t,
            cond,
            sigma_data=cfg.sigma_data,
            parameterisation=cfg.parameterisation,
            label_scale=cfg.label_scale,
        )

    return f_net


def scm_tangent(
    f_net: Callable[..., jax.Array],
    params: Any,
    x_t: jax.Array,
    t: jax.Array,
    dxdt: jax.Array,
    cond: Any,
    sigma_data: float,
    warmup: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """``(F-, g)``: the network at ``(x_t, t)`` and sCM's raw (unnormalised) tangent.

    ``g = -cos^2 t (sigma_d F- - dx/dt) - warmup cos t sin t (x_t + sigma_d dF-/dt)``; at
    ``warmup = 1`` it is ``cos(t) d f-(x_t, t)/dt`` along ``dx/dt``. One ``jax.jvp`` with
    tangents ``cos t sin t (dx/dt, 1)`` gives ``F-`` and ``cos t sin t dF-/dt``.
    """
    cs = jnp.cos(t) * jnp.sin(t)
    fn = lambda x, tt: f_net(params, x, tt, cond)  # noqa: E731
    f_minus, cs_dfdt = jax.jvp(fn, (x_t, t), (expand_to(cs, x_t) * dxdt, cs))
    cos = expand_to(jnp.cos(t), x_t)
    g1 = -(cos**2) * (sigma_data * f_minus - dxdt)
    g2 = -(expand_to(cs, x_t) * x_t + sigma_data * cs_dfdt)
    return f_minus, g1 + warmup * g2


def per_sample_norm(x: jax.Array) -> jax.Array:
    """``[B]`` L2 norms over all non-batch axes (tangent normalisation: ``g / (||g|| + c)``)."""
    return jnp.sqrt(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1))


def init_scm_state(
    key: jax.Array,
    student_params: Any,
    tx: optax.GradientTransformation,
    cfg: SCMConfig,
    ema_rates: tuple[float, ...] = (),
) -> SCMState:
    """Initial state; ``key`` initialises :class:`TimeWeight` (same optimizer ``tx``)."""
    weight_params = {}
    if cfg.weighting == "learned":
        weight_params = TimeWeight(cfg.weight_features).init(key, jnp.ones((1,)))["params"]
        weight_params = nn.unbox(weight_params)
    return SCMState(
        step=jnp.zeros((), jnp.int32),
        gen=create_train_state(copy_tree(student_params), tx, ema_rates),
        weight=create_train_state(weight_params, tx, ()),
    )


def make_scm_step(
    apply_student: NetApply,
    apply_teacher: NetApply | None,
    formulation: Formulation | None,
    cfg: SCMConfig,
    tx: optax.GradientTransformation,
    *,
    ema_warmup: bool = True,
) -> Callable:
    """Returns the pure ``step(state, teacher_params, batch, key) -> (state, metrics)``.

    Args:
        apply_student: the raw student network ``(params, x_in, noise_label, cond) -> F``.
        apply_teacher: the raw teacher network (sCD); unused by sCT.
        formulation: the teacher's formulation (wraps ``apply_teacher`` into its denoiser).
        cfg: the sCM config.
        tx: the optimizer of both the student and :class:`TimeWeight`.
        ema_warmup: EMA warm-up of the student's EMA copies (see ``update_ema``).

    ``key`` is the run's base key (the step is folded in); ``batch["image"]`` the data,
    ``batch.get("label")`` the conditioning.

    Raises:
        ValueError: sCD without a teacher or formulation.
    """
    if cfg.mode == "distill" and (apply_teacher is None or formulation is None):
        raise ValueError("mode='distill' (sCD) needs apply_teacher and formulation; or use 'train'")
    f_net = student_fn(apply_student, cfg)
    weight_net = TimeWeight(cfg.weight_features)
    sd = cfg.sigma_data

    def step(state: SCMState, teacher_params, batch, key):
        k_t, k_z = jax.random.split(jax.random.fold_in(key, state.step))
        x0 = batch["image"].astype(jnp.float32)
        cond = batch.get("label")
        t = sample_times(k_t, x0.shape[0], cfg)
        z = sd * jax.random.normal(k_z, x0.shape, jnp.float32)
        x_t = trig_noise(x0, z, t)
        if cfg.mode == "distill":

            def net(*args, **kwargs):
                return apply_teacher(teacher_params, *args, **kwargs)

            dxdt = teacher_velocity(formulation.as_denoiser(net), x_t, t, cond, sd)
        else:
            dxdt = expand_to(jnp.cos(t), x0) * z - expand_to(jnp.sin(t), x0) * x0
        dxdt = jax.lax.stop_gradient(dxdt)
        if cfg.tangent_warmup_steps:
            warmup = jnp.minimum(1.0, state.step / cfg.tangent_warmup_steps)
        else:
            warmup = jnp.float32(1.0)
        params_minus = jax.lax.stop_gradient(state.gen.params)
        f_minus, g = scm_tangent(f_net, params_minus, x_t, t, dxdt, cond, sd, warmup)
        g_norm = per_sample_norm(g)
        if cfg.normalize_tangent:
            g = g / expand_to(g_norm + cfg.tangent_norm_const, g)
        target = jax.lax.stop_gradient(f_minus + g)

        def loss_fn(trainable):
            params, w_params = trainable
            err = f_net(params, x_t, t, cond) - target
            mse = jnp.mean(err.reshape(err.shape[0], -1) ** 2, axis=1)
            if cfg.weighting == "learned":
                logvar = weight_net.apply({"params": w_params}, t)
                loss = jnp.exp(-logvar) * mse + logvar
            else:
                logvar = jnp.zeros_like(mse)
                loss = mse
            return jnp.mean(loss), (jnp.mean(mse), jnp.mean(logvar))

        trainable = (state.gen.params, state.weight.params)
        (loss, (mse, logvar)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        gen, weight = state.gen, state.weight
        new_gen = apply_gradients(gen, grads[0], tx, ema_warmup)
        w_upd, w_opt = tx.update(grads[1], weight.opt_state, weight.params)
        new_weight = TrainState(
            step=weight.step + 1,
            params=optax.apply_updates(weight.params, w_upd),
            ema=weight.ema,
            opt_state=w_opt,
        )
        metrics = {
            "loss": loss,
            "mse": mse,
            "logvar": logvar,
            "tangent_norm": jnp.mean(g_norm),
            "warmup": jnp.asarray(warmup, jnp.float32),
            "grad_norm": optax.tree.norm(grads[0]),
        }
        new_state = state.replace(step=state.step + 1, gen=new_gen, weight=new_weight)
        return new_state, metrics

    return step


def scm_sample_times(num_steps: int, cfg: SCMConfig) -> tuple[float, ...]:
    """Sampling times: ``t_max``, then ``num_steps - 1`` times evenly spaced from 1.1 down.

    One step is ``(t_max,)``; two steps the paper's ``(t_max, 1.1)``; ``K > 2`` steps
    (jaxdiff's choice) ``t_max`` then ``linspace(1.1, 0, K)[:K-1]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    mids = np.linspace(TWO_STEP_TIME, 0.0, num_steps)[: num_steps - 1]
    return (cfg.t_max, *(float(m) for m in mids))


def sample_scm(
    apply_student: NetApply,
    params: Any,
    noise: jax.Array,
    cond: Any,
    key: jax.Array,
    *,
    cfg: SCMConfig,
    num_steps: int = 1,
    times: Sequence[float] | None = None,
) -> jax.Array:
    """Multistep consistency sampling in TrigFlow.

    ``x0 = f(sigma_d noise, t_0)``; then for each later ``t``: re-noise
    ``x = cos(t) x0 + sin(t) sigma_d eps`` with fresh ``eps`` and ``x0 = f(x, t)``.

    Args:
        apply_student: the raw student network.
        params: its params (e.g. an EMA copy).
        noise: ``[B, ...]`` unit Gaussian noise.
        cond: conditioning.
        key: PRNG key of the re-noising (unused for one step).
        cfg: the config the student was trained with.
        num_steps: steps when ``times`` is None (:func:`scm_sample_times`).
        times: decreasing TrigFlow times, the first one the starting time.

    Returns:
        ``[B, ...]`` samples.
    """
    times = scm_sample_times(num_steps, cfg) if times is None else tuple(times)
    f_net = student_fn(apply_student, cfg)
    sd = cfg.sigma_data
    b = noise.shape[0]

    def f(x, t):
        tb = jnp.full((b,), t, jnp.float32)
        return consistency_fn(x, tb, f_net(params, x, tb, cond), sd)

    x0 = f(sd * noise.astype(jnp.float32), times[0])
    for i, t in enumerate(times[1:]):
        eps = jax.random.normal(jax.random.fold_in(key, i), noise.shape, jnp.float32)
        x0 = f(np.cos(t) * x0 + np.sin(t) * sd * eps, t)
    return x0


__all__ = [
    "MODES",
    "TWO_STEP_TIME",
    "WEIGHTINGS",
    "SCMConfig",
    "SCMState",
    "TimeWeight",
    "init_scm_state",
    "make_scm_step",
    "per_sample_norm",
    "sample_scm",
    "sample_times",
    "scm_sample_times",
    "scm_tangent",
    "student_fn",
]
