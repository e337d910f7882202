"""Guidance distillation: one network that is classifier-free guidance at any scale ``w``.

Stage one of Meng et al. 2023, "On Distillation of Guided Diffusion Models" (arXiv
2210.03142).

A class-conditional teacher guided by CFG costs two evaluations per step,
``D_w = D_u + w (D_c - D_u)`` (jaxdiff's convention: ``w = 1`` is the conditional model,
the paper's ``1 + w``; the unconditional branch is the null class ``num_classes``). The
student ``D_s(x, sigma, c; w)`` sees ``w`` as a second scalar input (``aux_time =
aux_scale * w``, e.g. a UNet/DiT built with ``aux_time_embed=True``) and regresses the
teacher's guided output at the same noisy input, per sample ``w ~ U[w_min, w_max]`` and
``sigma`` from the teacher's own training distribution:

    loss = E[ lambda(sigma) * mean_pixels((D_s(x, sigma, c; w) - sg D_w(x, sigma, c))^2) ],

with the formulation's weight ``lambda = 1 / c_out^2``, the weight jaxdiff's denoising
training uses (:meth:`~jaxdiff.diffusion.formulation.Formulation.loss_weight`): the loss is
the MSE of the network outputs. Sampling then needs one evaluation per step at any ``w``
(:func:`guided_student_denoiser`); stage two (fewer steps) is progressive distillation of
this student.

The student starts from the teacher's weights with a fresh ``aux_time`` embedding
(:func:`graft_params`); that embedding's last layer is zero-initialised, so the student
starts as the conditional teacher at every ``w``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.typing import ArrayLike

from jaxdiff.diffusion.formulation import Denoiser, Formulation, expand_to
from jaxdiff.generate import class_conditions
from jaxdiff.guidance.base import eval_branches
from jaxdiff.parallel import replicated
from jaxdiff.training.state import (
    TrainState,
    apply_gradients,
    copy_tree,
    create_train_state,
    train_state_shardings,
)

NetApply = Callable[..., jax.Array]
"""``apply(params, x_in, noise_label, cond, **kwargs) -> network output``."""

W_SAMPLINGS = ("uniform",)
"""How the per-sample guidance scale is drawn."""

FRESH_SUBTREES = ("aux_time_embed",)
"""Student param subtrees that may be absent from the teacher (kept from the fresh init)."""


@dataclasses.dataclass(frozen=True)
class GuidanceDistillConfig:
    """Knobs of guidance distillation (hashable: closed over by the jitted step).

    Attributes:
        w_min: smallest guidance scale trained (1 = the conditional model).
        w_max: largest guidance scale trained (``w_min = w_max`` trains one scale).
        w_sampling: ``"uniform"``: ``w ~ U[w_min, w_max]`` per sample (the paper).
        num_classes: the teacher's real classes; label ``num_classes`` is its null class.
        aux_scale: the student's second input is ``aux_time = aux_scale * w``.
    """

    w_min: float = 1.0
    w_max: float = 4.0
    w_sampling: str = "uniform"
    num_classes: int = 0
    aux_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.w_sampling not in W_SAMPLINGS:
            raise ValueError(f"w_sampling={self.w_sampling!r}: choose one of {W_SAMPLINGS}")
        if not (math.isfinite(self.w_min) and math.isfinite(self.w_max)):
            raise ValueError(f"w_min={self.w_min} and w_max={self.w_max} must be finite")
        if not 0.0 <= self.w_min <= self.w_max:
            raise ValueError(
                f"need 0 <= w_min <= w_max, got w_min={self.w_min}, w_max={self.w_max} "
                "(w = 1 is the conditional model, w > 1 guides)"
            )
        if self.num_classes <= 0:
            raise ValueError(
                f"num_classes={self.num_classes}: guidance distillation needs a "
                "class-conditional teacher trained with label dropout; set num_classes to "
                "the teacher's number of classes"
            )
        if not (math.isfinite(self.aux_scale) and self.aux_scale > 0):
            raise ValueError(
                f"aux_scale={self.aux_scale} must be finite and > 0 (aux_time = aux_scale * w)"
            )


@flax.struct.dataclass
class GuidanceDistillState:
    """A guidance distillation run's state (the teacher's params are passed separately).

    Attributes:
        step: updates done.
        gen: the w-conditioned student's params, EMA copies and optax state.
    """

    step: jax.Array
    gen: TrainState


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def graft_params(
    teacher_params: Any, student_init_params: Any, *, fresh: Sequence[str] = FRESH_SUBTREES
) -> Any:
    """The student's init tree with every teacher leaf copied in.

    Both trees are unboxed param trees. Leaves of ``student_init_params`` under a subtree
    named in ``fresh`` (the ``aux_time`` embedding) may be missing from the teacher and
    keep their fresh values; every other student leaf must come from the teacher, so an
    architecture mismatch fails here rather than training a half-initialised student.
    Copied leaves take the student's dtype.

    Args:
        teacher_params: the teacher's params.
        student_init_params: a fresh init of the student (teacher architecture plus the
            ``aux_time`` embedding).
        fresh: names of subtrees the student may add.

    Returns:
        A new tree structured like ``student_init_params``.

    Raises:
        ValueError: a teacher leaf the student lacks, a leaf of another shape, or a
            student leaf outside ``fresh`` that the teacher lacks.
    """
    teacher = {_path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(teacher_params)}
    student = jax.tree_util.tree_leaves_with_path(student_init_params)
    student_names = {_path_name(p) for p, _ in student}
    missing = sorted(set(teacher) - student_names)
    if missing:
        raise ValueError(
            f"teacher params {missing[:5]} have no counterpart in the student: build the "
            "student with the teacher's architecture (plus aux_time_embed=True)"
        )

    def graft(path, leaf):
        name = _path_name(path)
        if name not in teacher:
            if not any(k in fresh for k in name.split("/")):
                raise ValueError(
                    f"student param {name!r} is not in the teacher and not under {tuple(fresh)}"
                    ": build the student with the teacher's architecture (plus "
                    "aux_time_embed=True)"
                )
            return leaf
        src = teacher[name]
        if jnp.shape(src) != jnp.shape(leaf):
            raise ValueError(
                f"teacher param {name!r} has shape {jnp.shape(src)} but the student's has "
                f"{jnp.shape(leaf)}: build the student with the teacher's architecture"
            )
        return jnp.asarray(src, jnp.result_type(leaf))

    return jax.tree_util.tree_map_with_path(graft, student_init_params)


def init_guidance_distill_state(
    key: jax.Array,
    student_params: Any,
    tx: optax.GradientTransformation,
    cfg: GuidanceDistillConfig,
    ema_rates: Sequence[float] = (),
) -> GuidanceDistillState:
    """The initial state from the student's full params (e.g. :func:`graft_params`'s).

    ``key`` and ``cfg`` are unused: the student starts from the given weights.
    """
    del key, cfg
    copy = copy_tree(student_params)
    return GuidanceDistillState(
        step=jnp.zeros((), jnp.int32), gen=create_train_state(copy, tx, tuple(ema_rates))
    )


def sample_w(key: jax.Array, batch: int, cfg: GuidanceDistillConfig) -> jax.Array:
    """``[batch]`` guidance scales ``w ~ U[w_min, w_max]``."""
    return jax.random.uniform(key, (batch,), jnp.float32, cfg.w_min, cfg.w_max)


def draw_inputs(
    key: jax.Array, x0: jax.Array, formulation: Formulation, cfg: GuidanceDistillConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(sigma [B], eps like x0, w [B])`` of one loss evaluation from ``key``."""
    k_sigma, k_eps, k_w = jax.random.split(key, 3)
    b = x0.shape[0]
    sigma = formulation.sample_sigma(k_sigma, (b,))
    return sigma, jax.random.normal(k_eps, x0.shape, jnp.float32), sample_w(k_w, b, cfg)


def teacher_cfg_target(
    apply_teacher: NetApply,
    teacher_params: Any,
    formulation: Formulation,
    x: jax.Array,
    sigma: jax.Array,
    cond: jax.Array,
    w: ArrayLike,
    num_classes: int,
) -> jax.Array:
    """The teacher's ``D_u + w (D_c - D_u)`` (both branches as one ``2B`` batch)."""

    def net(*args, **kwargs):
        return apply_teacher(teacher_params, *args, **kwargs)

    cond, uncond = class_conditions(cond, num_classes)
    d_c, d_u = eval_branches(formulation.as_denoiser(net), x, sigma, (cond, uncond))
    return d_u + expand_to(w, x) * (d_c - d_u)


def guided_student_denoiser(
    apply_student: NetApply,
    params: Any,
    formulation: Formulation,
    w: ArrayLike,
    aux_scale: float = 1.0,
) -> Denoiser:
    """The student at guidance scale ``w``: ``denoise(x, sigma, cond)``, one evaluation.

    Args:
        apply_student: the raw student network (takes ``aux_time=``).
        params: its params (e.g. an EMA copy).
        formulation: the teacher's formulation.
        w: a scalar or per-sample ``[B]`` guidance scale.
        aux_scale: the config's ``aux_scale`` it was trained with.

    Returns:
        A :data:`~jaxdiff.diffusion.formulation.Denoiser` for any jaxdiff sampler (without
        a guidance method: the guidance is inside the network).
    """

    def net(*args, **kwargs):
        return apply_student(params, *args, **kwargs)

    def denoise(x: jax.Array, sigma: ArrayLike, cond: Any = None, **kwargs: Any) -> jax.Array:
        aux = aux_scale * jnp.asarray(w, jnp.float32)
        if aux.ndim == 0:
            aux = jnp.broadcast_to(aux, x.shape[:1])
        return formulation.denoise(net, x, sigma, cond, aux_time=aux, **kwargs)

    return denoise


def _labels(batch: dict) -> jax.Array:
    if batch.get("label") is None:
        raise ValueError(
            "guidance distillation needs class labels: the batch has no 'label' entry; use "
            "a labelled data set and a class-conditional teacher"
        )
    return jnp.asarray(batch["label"], jnp.int32)


def make_guidance_distill_loss(
    apply_student: NetApply,
    apply_teacher: NetApply,
    formulation: Formulation,
    cfg: GuidanceDistillConfig,
) -> Callable:
    """``loss(params, teacher_params, batch, key) -> (loss, metrics)`` (see module doc).

    ``key`` is used as is (:func:`draw_inputs`); the teacher is called without
    ``aux_time``, the student with ``aux_time = aux_scale * w``.
    """

    def loss_fn(params, teacher_params, batch, key):
        x0 = jnp.asarray(batch["image"], jnp.float32)
        cond = _labels(batch)
        sigma, eps, w = draw_inputs(key, x0, formulation, cfg)
        x = x0 + expand_to(sigma, x0) * eps
        target = teacher_cfg_target(
            apply_teacher, teacher_params, formulation, x, sigma, cond, w, cfg.num_classes
        )
        target = jax.lax.stop_gradient(target)
        d_s = guided_student_denoiser(apply_student, params, formulation, w, cfg.aux_scale)(
            x, sigma, cond
        )
        sq = ((d_s - target) ** 2).reshape(x.shape[0], -1)
        loss = jnp.mean(formulation.loss_weight(sigma) * jnp.mean(sq, axis=1))
        return loss, {"loss": loss, "w_mean": jnp.mean(w)}

    return loss_fn


def make_guidance_distill_step(
    apply_student: NetApply,
    apply_teacher: NetApply,
    formulation: Formulation,
    cfg: GuidanceDistillConfig,
    tx: optax.GradientTransformation,
    *,
    ema_warmup: bool = True,
) -> Callable:
    """The pure step ``step(state, teacher_params, batch, key) -> (state, metrics)``.

    Args:
        apply_student: the raw student network, called with ``aux_time=``.
        apply_teacher: the raw teacher network (``apply(params, x_in, noise_label, cond)``).
        formulation: the teacher's formulation (its sigma distribution and weighting).
        cfg: the config.
        tx: the optimizer.
        ema_warmup: EMA warm-up of the EMA copies.

    ``batch`` needs ``"image"`` and ``"label"``; ``key`` is the run's base key (the step is
    folded in). Metrics: ``loss``, ``grad_norm``, ``w_mean``.
    """
    loss_fn = make_guidance_distill_loss(apply_student, apply_teacher, formulation, cfg)

    def step(state: GuidanceDistillState, teacher_params, batch, key):
        k = jax.random.fold_in(key, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.gen.params, teacher_params, batch, k)
        gen = apply_gradients(state.gen, grads, tx, ema_warmup)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return state.replace(step=state.step + 1, gen=gen), metrics

    return step


def guidance_distill_state_shardings(
    abstract: GuidanceDistillState, p_shard: Any, tx: optax.GradientTransformation, mesh: Mesh
) -> GuidanceDistillState:
    """Shardings of the state: params-shaped leaves follow ``p_shard``, the rest replicated."""
    return GuidanceDistillState(
        step=replicated(mesh), gen=train_state_shardings(abstract.gen, p_shard, tx, mesh)
    )


__all__ = [
    "FRESH_SUBTREES",
    "W_SAMPLINGS",
    "GuidanceDistillConfig",
    "GuidanceDistillState",
    "draw_inputs",
    "graft_params",
    "guidance_distill_state_shardings",
    "guided_student_denoiser",
    "init_guidance_distill_state",
    "make_guidance_distill_loss",
    "make_guidance_distill_step",
    "sample_w",
    "teacher_cfg_target",
]
