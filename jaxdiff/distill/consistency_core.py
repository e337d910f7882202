"""Consistency models' core: parameterisation, distances, teacher ODE step, losses, sampling.

**Parameterisation** (Song et al. 2023, Appendix C): a consistency function

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), cond)
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)
    c_out  = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)

so ``f(x, sigma_min) = x`` holds by construction (``c_skip = 1``, ``c_out = 0`` there), for
any weights. ``F`` is the teacher's own network, with the teacher formulation's ``c_in`` and
``c_noise``, started from the teacher's weights. This is the standard construction because
for an EDM teacher the two preconditionings differ only near ``sigma_min`` (EDM's ``c_skip``
and ``c_out`` are the formulas above with ``sigma_min = 0``), so the initial student is the
teacher's one-step denoiser ``D`` everywhere else; with ``sigma_min = 0`` (ECT) ``f`` *is*
EDM's ``D``. A teacher of another formulation (VP epsilon, v, flow) gets its output mapped
into EDM's ``F`` first, ``F_edm = (D - c_skip_edm x) / c_out_edm``, which keeps the same
"student starts as the teacher's ``D``" property; :class:`ConsistencyFormulation` folds all
of this into plain :class:`~jaxdiff.diffusion.formulation.Precond` coefficients, so the
student is an ordinary jaxdiff formulation (``formulation.denoise(net, x, sigma, cond)``).

**Losses** take consistency functions as callables ``f(x, sigma, cond)`` (tests plug in
exact ones): :func:`cd_loss` (one teacher ODE step with any deterministic solver,
:func:`teacher_ode_step`) and :func:`ct_loss` (ECT, :func:`ect_r`). **Sampling**:
:func:`multistep_sample` (Song et al.'s Algorithm 1) on :func:`student_fn`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.diffusion.edm import EDM
from jaxdiff.diffusion.formulation import Cond, Denoiser, Formulation, Precond, expand_to
from jaxdiff.distill.few_step import student_sigmas
from jaxdiff.guidance.base import GuideOut
from jaxdiff.samplers.base import EvalState, Solver, batch_keys, normal_like, step_keys

ConsistencyFn = Callable[..., jax.Array]
"""``f(x, sigma, cond) -> x_at_sigma_min`` with ``sigma`` of shape ``[B]``."""
NetApply = Callable[..., jax.Array]
"""``apply(params, x_in, noise_label, cond) -> F``: a raw network of the teacher's shape."""

METRICS = ("l2", "pseudo_huber")
"""Distances ``d``: ``l2`` = mean squared error over pixels (Song et al.), ``pseudo_huber`` =
``sqrt(||a - b||^2 + c^2) - c`` over all pixels (iCT/ECT)."""
WEIGHTINGS = ("uniform", "inverse_dt")
"""Loss weights ``lambda``: 1, or ``1 / (sigma_hi - sigma_lo)`` (iCT's and ECT's)."""
MAPPINGS = ("sigmoid", "const")
"""ECT's ``t -> r`` mappings (:func:`ect_r`)."""


def consistency_scalings(
    sigma: ArrayLike, sigma_min: float, sigma_data: float
) -> tuple[jax.Array, jax.Array]:
    """Song et al.'s ``(c_skip, c_out)``: exactly ``(1, 0)`` at ``sigma = sigma_min``."""
    sigma = jnp.asarray(sigma, jnp.float32)
    sd2 = sigma_data**2
    shifted = sigma - sigma_min
    c_skip = sd2 / (shifted**2 + sd2)
    c_out = shifted * sigma_data * jax.lax.rsqrt(sigma**2 + sd2)
    return c_skip, c_out


@dataclasses.dataclass(frozen=True)
class ConsistencyFormulation(Formulation):
    """A teacher's formulation with the consistency boundary ``f(x, sigma_min) = x`` built in.

    ``denoise(net, x, sigma, cond)`` returns ``f = c_skip x + c_out F_edm`` with Song et al.'s
    ``c_skip``/``c_out`` and ``F_edm`` the network's output expressed in EDM's
    parameterisation (the raw output itself for an EDM base of the same ``sigma_data``).
    Training noise levels and noise labels are the base's.

    Attributes:
        base: the teacher's formulation (gives ``c_in``, ``c_noise`` and the meaning of F).
        sigma_min: the boundary level (0 = EDM's denoiser exactly, as in ECT).
        sigma_data: the data std of the consistency scalings.
    """

    base: Formulation = dataclasses.field(default_factory=EDM)
    sigma_min: float = 0.002
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if not self.sigma_min >= 0.0:
            raise ValueError(f"sigma_min must be >= 0, got {self.sigma_min}")
        if not self.sigma_data > 0.0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")

    def precondition(self, sigma: jax.Array) -> Precond:
        """See :class:`Formulation`."""
        base = self.base.precondition(sigma)
        c_skip, c_out = consistency_scalings(sigma, self.sigma_min, self.sigma_data)
        if isinstance(self.base, EDM) and self.base.sigma_data == self.sigma_data:
            return Precond(c_skip, c_out, base.c_in, base.c_noise)
        # F_edm = ((c_skip_b - c_skip_e) x + c_out_b F) / c_out_e, folded into (c_skip, c_out).
        edm = EDM(sigma_data=self.sigma_data).precondition(sigma)
        return Precond(
            c_skip=c_skip + c_out * (base.c_skip - edm.c_skip) / edm.c_out,
            c_out=c_out * base.c_out / edm.c_out,
            c_in=base.c_in,
            c_noise=base.c_noise,
        )

    def sample_sigma(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """See :class:`Formulation` (the base's distribution)."""
        return self.base.sample_sigma(key, shape)

    def sigma_from_noise_label(self, c_noise: ArrayLike) -> jax.Array:
        """See :class:`Formulation` (the base's labels)."""
        return self.base.sigma_from_noise_label(c_noise)


def distance(a: jax.Array, b: jax.Array, metric: str, huber_c: float | None = None) -> jax.Array:
    """Per-sample distance ``[B]`` (:data:`METRICS`).

    Args:
        a: ``[B, ...]`` prediction.
        b: ``[B, ...]`` target.
        metric: ``"l2"`` (mean of squares) or ``"pseudo_huber"``.
        huber_c: pseudo-Huber's ``c``; None = iCT's ``0.00054 sqrt(dim)``; 0 gives the plain
            L2 norm (ECT's CIFAR-10 setting), whose gradient is guarded at ``a = b``.
    """
    sq = jnp.sum(((a - b) ** 2).reshape(a.shape[0], -1), axis=1)
    dim = a[0].size
    if metric == "l2":
        return sq / dim
    if metric != "pseudo_huber":
        raise ValueError(f"metric={metric!r}: choose one of {METRICS}")
    c = 0.00054 * dim**0.5 if huber_c is None else float(huber_c)
    total = sq + c**2
    safe = jnp.where(total > 0, total, 1.0)  # sqrt'(0) is inf: keep 0 * inf out of the grad
    return jnp.where(total > 0, jnp.sqrt(safe), 0.0) - c


def loss_weight(sigma_hi: jax.Array, sigma_lo: jax.Array, weighting: str) -> jax.Array:
    """``lambda`` per sample (:data:`WEIGHTINGS`); 0 where the two levels coincide."""
    if weighting == "uniform":
        return jnp.ones_like(sigma_hi)
    if weighting != "inverse_dt":
        raise ValueError(f"weighting={weighting!r}: choose one of {WEIGHTINGS}")
    gap = sigma_hi - sigma_lo
    return jnp.where(gap > 0, 1.0 / jnp.where(gap > 0, gap, 1.0), 0.0)


def teacher_ode_step(
    denoise: Denoiser,
    solver: Solver,
    x: jax.Array,
    sigma_from: jax.Array,
    sigma_to: jax.Array,
    cond: Cond = None,
) -> jax.Array:
    """One step of ``solver`` on the teacher's PF-ODE, from ``sigma_from[b]`` to ``sigma_to[b]``.

    Solvers step one scalar level pair for a whole batch, while CD draws a level per sample,
    so the step is vmapped over samples (each lane is a batch of one). Solver history (e.g.
    DPM-Solver++'s) is empty on a first step, so multistep solvers take their first-order step.

    Raises:
        ValueError: for a stochastic solver (CD needs the deterministic ODE).
    """
    if solver.stochastic:
        raise ValueError(
            f"{type(solver).__name__} is stochastic: consistency distillation follows the "
            "probability-flow ODE, so pick a deterministic solver (euler, heun, dpmpp_2m)"
        )

    def one(xb, s_from, s_to, cb):
        xb = xb[None]
        cb = jax.tree.map(lambda c: c[None], cb)
        sigmas = jnp.stack([s_from, s_to]).astype(jnp.float32)

        def den(xx, sigma, ev, substep=0):
            del substep
            x0 = denoise(xx, jnp.broadcast_to(sigma, (1,)), cb)
            return GuideOut(x0.astype(xx.dtype), 1), EvalState(ev.guidance, ev.nfe + 1)

        ev = EvalState((), jnp.zeros((), jnp.int32))
        keys = jax.random.split(jax.random.key(0), 1)  # unused by deterministic solvers
        state = solver.init(xb, sigmas)
        out, _, _ = solver.step(den, xb, jnp.zeros((), jnp.int32), sigmas, state, ev, keys)
        return out[0]

    return jax.vmap(one)(x, sigma_from, sigma_to, cond)


def cd_loss(
    student: ConsistencyFn,
    target: ConsistencyFn,
    teacher: Denoiser,
    solver: Solver,
    x0: jax.Array,
    eps: jax.Array,
    sigma_hi: jax.Array,
    sigma_lo: jax.Array,
    cond: Cond = None,
    *,
    metric: str = "l2",
    huber_c: float | None = None,
    weighting: str = "uniform",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Consistency distillation: ``lambda d(f(x_hi, sigma_hi), sg f_target(x^_lo, sigma_lo))``.

    ``x_hi = x0 + sigma_hi eps`` and ``x^_lo`` is one teacher ODE step from it to
    ``sigma_lo`` (:func:`teacher_ode_step`). Returns ``(mean loss, metrics)``.
    """
    x_hi = x0 + expand_to(sigma_hi, x0) * eps
    x_lo = jax.lax.stop_gradient(teacher_ode_step(teacher, solver, x_hi, sigma_hi, sigma_lo, cond))
    goal = jax.lax.stop_gradient(target(x_lo, sigma_lo, cond))
    d = distance(student(x_hi, sigma_hi, cond), goal, metric, huber_c)
    loss = jnp.mean(loss_weight(sigma_hi, sigma_lo, weighting) * d)
    return loss, {"loss": loss, "distance": jnp.mean(d)}


def ect_r(
    t: jax.Array,
    stage: ArrayLike,
    *,
    q: float = 2.0,
    mapping: str = "sigmoid",
    k: float = 8.0,
    b: float = 1.0,
    sigma_min: float = 0.0,
) -> jax.Array:
    """ECT's smaller level ``r(t)`` at training stage ``stage`` (Geng et al. 2024).

    ``r = t (1 - q^-(stage+1) n(t))`` with ``n(t) = 1 + k sigmoid(-b t)`` (``"sigmoid"``)
    or 1 (``"const"``), clipped to ``sigma_min``: the gap ``dt = t - r`` shrinks by ``q``
    every stage, so CT starts near the denoising loss (``r`` clipped to the boundary, the
    target is the data) and tends to the continuous-time consistency condition.
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping={mapping!r}: choose one of {MAPPINGS}")
    decay = jnp.power(jnp.float32(q), -(jnp.asarray(stage, jnp.float32) + 1.0))
    n_t = 1.0 + k * jax.nn.sigmoid(-b * t) if mapping == "sigmoid" else 1.0
    return jnp.maximum(t * (1.0 - decay * n_t), sigma_min)


def ct_target(
    student: ConsistencyFn,
    x0: jax.Array,
    eps: jax.Array,
    r: jax.Array,
    cond: Cond = None,
    sigma_min: float = 0.0,
) -> jax.Array:
    """CT's stop-gradient target ``sg f(x0 + r eps, r)``: ``x0 + sigma_min eps`` at the boundary.

    ``f`` is not evaluated at ``r <= sigma_min`` (EDM's noise label ``log r`` is ``-inf`` at
    0); the boundary condition gives its value there.
    """
    at_boundary = r <= sigma_min
    x_r = x0 + expand_to(jnp.maximum(r, sigma_min), x0) * eps
    safe_r = jnp.where(at_boundary, jnp.maximum(sigma_min, 1.0), r)
    f_r = student(x_r, safe_r, cond)
    mask = at_boundary.reshape(at_boundary.shape + (1,) * (x0.ndim - 1))
    return jax.lax.stop_gradient(jnp.where(mask, x_r, f_r))


def ct_loss(
    student: ConsistencyFn,
    x0: jax.Array,
    eps: jax.Array,
    t: jax.Array,
    r: jax.Array,
    cond: Cond = None,
    *,
    sigma_min: float = 0.0,
    metric: str = "pseudo_huber",
    huber_c: float | None = None,
    weighting: str = "inverse_dt",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Consistency training (ECT): ``lambda(t, r) d(f(x0 + t eps, t), sg f(x0 + r eps, r))``.

    No teacher: the same ``x0`` and ``eps`` give both points, and the target comes from the
    student's current params through a stop-gradient (:func:`ct_target`). ECT's adaptive
    weighting is ``1 / (t - r)`` together with the pseudo-Huber metric.
    """
    x_t = x0 + expand_to(t, x0) * eps
    goal = ct_target(student, x0, eps, r, cond, sigma_min)
    d = distance(student(x_t, t, cond), goal, metric, huber_c)
    loss = jnp.mean(loss_weight(t, r, weighting) * d)
    return loss, {"loss": loss, "distance": jnp.mean(d), "dt": jnp.mean(t - r)}


def ect_stage(step: int | jax.Array, stage_length: int) -> jax.Array:
    """ECT's stage at training step ``step``: ``step // stage_length`` (traced, no recompile)."""
    return jnp.asarray(step, jnp.int32) // stage_length


def student_fn(
    apply_student: NetApply, formulation: Formulation, sigma_min: float, sigma_data: float = 0.5
) -> Callable[[Any], ConsistencyFn]:
    """``params -> f(x, sigma, cond)``: the consistency function on the teacher's network."""
    cm = ConsistencyFormulation(formulation, sigma_min, sigma_data)

    def of(params):
        def net(x_in, noise_label, cond):
            return apply_student(params, x_in, noise_label, cond)

        return cm.as_denoiser(net)

    return of


def multistep_sample(
    f: ConsistencyFn,
    noise: jax.Array,
    cond: Cond,
    sigmas: Sequence[float] | jax.Array,
    sigma_min: float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """Multistep consistency sampling with a consistency function ``f(x, sigma[B], cond)``.

    ``x0 = f(sigma_0 noise)``; then for ``k >= 1`` re-noise with fresh noise to the marginal
    of level ``sigma_k``, ``x = x0 + sqrt(sigma_k^2 - sigma_min^2) eps`` (``x0`` already
    carries ``sigma_min`` of noise), and ``x0 = f(x, sigma_k)``. ``key`` is one key (sample
    ``b`` uses ``fold_in(key, b)``) or ``[B]`` per-sample keys; the re-noising before level
    ``k`` uses step key ``k - 1``, the sampling driver's convention, so a sample does not
    depend on its batch, and with ``sigma_min = 0`` this is
    :func:`~jaxdiff.distill.few_step.few_step_sample` (the ``renoise`` solver) key for key.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num, batch = sigmas.shape[0], noise.shape[:1]
    if num > 1 and key is None:
        raise ValueError("multistep sampling re-noises between steps: pass key=")
    keys = batch_keys(key, batch[0]) if num > 1 else None
    x0 = f(sigmas[0] * noise, jnp.broadcast_to(sigmas[0], batch), cond)
    for i in range(1, num):
        eps = normal_like(step_keys(keys, jnp.int32(i - 1))[0], x0)
        scale = jnp.sqrt(jnp.maximum(sigmas[i] ** 2 - sigma_min**2, 0.0))
        x0 = f(x0 + expand_to(scale, x0) * eps, jnp.broadcast_to(sigmas[i], batch), cond)
    return x0


def sample_consistency(
    apply_student: NetApply,
    params: Any,
    noise: jax.Array,
    cond: Cond,
    formulation: Formulation,
    cfg: Any,
    sigmas: Sequence[float] | None = None,
    key: jax.Array | None = None,
    *,
    num_steps: int = 1,
) -> jax.Array:
    """Samples a CD/CT student as trained (its consistency function, :func:`multistep_sample`).

    Args:
        apply_student: the student's raw network apply.
        params: its params (e.g. an EMA copy).
        noise: ``[B, ...]`` unit Gaussian noise.
        cond: conditioning or None.
        formulation: the teacher's formulation (the one ``F`` was trained under).
        cfg: the run's :class:`~jaxdiff.distill.consistency.CDConfig` or ``CTConfig``
            (``sigma_min``, ``sigma_data``, ``sigma_max``, and ``rho`` if it has one).
        sigmas: the levels, first = the start; default: :func:`.few_step.student_sigmas`
            of ``num_steps`` between ``max(sigma_min, 0.002)`` and ``cfg.sigma_max``.
        key: re-noising key (needed for more than one level).
        num_steps: levels of the default ``sigmas``.
    """
    if sigmas is None:
        floor = max(cfg.sigma_min, 0.002)
        sigmas = student_sigmas(num_steps, floor, cfg.sigma_max, getattr(cfg, "rho", 7.0))
    f = student_fn(apply_student, formulation, cfg.sigma_min, cfg.sigma_data)(params)
    return multistep_sample(f, noise, cond, sigmas, cfg.sigma_min, key)


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raises ValueError naming ``name`` when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: choose one of {allowed}")


__all__ = [
    "MAPPINGS",
    "METRICS",
    "WEIGHTINGS",
    "ConsistencyFn",
    "ConsistencyFormulation",
    "NetApply",
    "cd_loss",
    "check_choice",
    "consistency_scalings",
    "ct_loss",
    "ct_target",
    "distance",
    "ect_r",
    "ect_stage",
    "loss_weight",
    "multistep_sample",
    "sample_consistency",
    "student_fn",
    "teacher_ode_step",
]
