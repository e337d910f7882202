"""What the distillation driver and its methods share: context, :class:`Method`, helpers.

A method (:mod:`jaxdiff.experiment.distill_methods`) is built from a
:class:`DistillContext` (config, teacher, mesh) into a :class:`Method`: the state's
initialiser and shardings, the jitted step, the student's network and the config stored
beside its checkpoints. Most methods are one pure ``step(state, teacher_params, batch,
key)`` from :mod:`jaxdiff.distill`, wrapped by :func:`simple_method`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from jaxdiff.distill.guidance_distill import graft_params
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.builders import RUN_KEY, build_optimizer
from jaxdiff.experiment.runs import TrainedModel
from jaxdiff.experiment.sampling import student_sample_recipe
from jaxdiff.parallel import batch_sharding, param_shardings, replicated
from jaxdiff.training.state import init_params_fn, train_state_shardings

DRIVER_KEYS = ("num_steps", "learning_rate", "sample_levels", "sample_steps", "sample_scale")
"""Keys of a method's section read by the driver, not by the method's dataclass config."""


@dataclasses.dataclass
class DistillContext:
    """What every method is built from.

    Attributes:
        config: the distillation config (``method`` and ``train.num_steps`` resolved).
        teacher: the restored teacher run, on ``mesh``.
        mesh: the run's mesh.
        meta: the run metadata stored with the student (classes, sample shape).
    """

    config: ml_collections.ConfigDict
    teacher: TrainedModel
    mesh: Any
    meta: dict

    @property
    def key(self) -> jax.Array:
        """The run's base key (each step folds its index in)."""
        return jax.random.key(self.config.seed)

    def section(self, name: str) -> ml_collections.ConfigDict:
        """The method's config section ``config.<name>``."""
        return self.config[name]

    def stored(self, **changes: Any) -> dict:
        """:func:`stored_config` of this run with ``changes`` (sample, model, formulation)."""
        return stored_config(self.config, self.teacher.config, self.meta, **changes)


@dataclasses.dataclass
class Method:
    """A distillation method as the driver runs it.

    Attributes:
        init: ``(key, teacher_params) -> state``, the whole resumable state (the student
            at ``state.gen``). The teacher's params are an argument, never a constant
            closed over: jitted, a large teacher would otherwise be baked into the program.
        shardings: the state's shardings.
        step: ``(state, batch, iteration) -> (state, metrics)``; ``iteration`` (0-based) is
            the loop's, for methods whose schedule lives outside the jitted step.
        saved: the student's config, stored beside its checkpoints.
        student_model: the student's network (the teacher's, or it with ``aux_time``).
        student_shardings: the student's param shardings.
        progress_metric: the metric shown in the progress line.
    """

    init: Callable[[jax.Array, Any], Any]
    shardings: Any
    step: Callable[[Any, Any, int], tuple[Any, dict]]
    saved: dict
    student_model: nn.Module
    student_shardings: Any
    progress_metric: str = "loss"


def net_apply(model: nn.Module) -> Callable[..., jax.Array]:
    """``apply(params, x_in, noise_label, cond, **kwargs)`` of a linen model (no dropout)."""

    def apply(params, *args, **kwargs):
        return model.apply({"params": params}, *args, **kwargs)

    return apply


def method_config(ctx: DistillContext, name: str, cls: type, **fixed: Any) -> Any:
    """``cls(**config.<name>)`` (driver keys dropped) with ``fixed`` values filled in.

    A ``fixed`` value (e.g. the teacher's sigma range) fills a key the section leaves out
    or sets to None; a value the section sets is kept (builders check the ones that must
    not differ, such as sCM's parameterisation).

    Raises:
        InvalidArgumentError: naming the section for an unknown key or a bad value.
    """
    kwargs = {k: v for k, v in ctx.section(name).to_dict().items() if k not in DRIVER_KEYS}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    for key, value in fixed.items():
        if kwargs.get(key) is None:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(
            f"config.{name}: {err}; fix the value with --config.{name}.KEY=VALUE"
        ) from None


def state_shardings(abstract: Any, p_shard: Any, tx: Any, mesh: Any) -> Any:
    """Shardings of a method's state.

    ``gen`` is a TrainState over ``p_shard``; params-shaped ``target``/``teacher`` follow
    ``p_shard``; everything else (the step, small nets such as sCM's weighting) is
    replicated.
    """
    rep = replicated(mesh)
    out = {}
    for field in dataclasses.fields(abstract):
        value = getattr(abstract, field.name)
        if field.name == "gen":
            out[field.name] = train_state_shardings(value, p_shard, tx, mesh)
        elif field.name in ("target", "teacher"):
            out[field.name] = p_shard
        else:
            out[field.name] = jax.tree.map(lambda _: rep, value)
    return abstract.replace(**out)


def stored_config(
    config: ml_collections.ConfigDict,
    teacher_config: ml_collections.ConfigDict,
    meta: dict,
    *,
    sample: dict,
    model: dict | None = None,
    formulation: dict | None = None,
) -> dict:
    """The student's config, stored beside its checkpoints.

    It is the teacher's, with the student's optimizer, EMAs, network changes, formulation
    changes and sampling recipe, plus the distillation config as ``distill_config``.

    Args:
        config: the distillation config (stored as ``distill_config``).
        teacher_config: the teacher run's config.
        meta: the run metadata (classes, sample shape).
        sample: entries replacing the teacher's ``config.sample`` (the student's recipe).
        model: entries replacing the teacher's ``config.model``.
        formulation: entries replacing the teacher's ``config.formulation``.
    """
    out = teacher_config.to_dict()
    out["optim"] = config.optim.to_dict()
    # Only constant-rate EMAs are kept: a teacher's power-EMA profiles are not tracked.
    out["train"] = {**out["train"], "ema_rates": tuple(config.train.ema_rates), "ema_stds": ()}
    out["model"] = {**out["model"], **(model or {})}
    out["formulation"] = {**out["formulation"], **(formulation or {})}
    out["sample"] = {**out["sample"], **sample}
    out["distill_config"] = config.to_dict()
    out[RUN_KEY] = meta
    return out


def recipe(solver: str, levels: Any, ctx: DistillContext, name: str) -> dict:
    """``config.sample`` entries: ``solver`` at ``levels``, ``sample_steps`` of them by default."""
    out = student_sample_recipe(levels)
    steps = int(ctx.section(name).get("sample_steps", out["steps"]))
    if not 1 <= steps <= out["steps"]:
        raise InvalidArgumentError(
            f"config.{name}.sample_steps={steps} must lie in 1..{out['steps']} (its sample_levels)"
        )
    return {**out, "solver": solver, "steps": steps}


def sample_levels(ctx: DistillContext, name: str) -> int:
    """K, the levels of ``config.<name>``'s stored recipe (``sample_levels``, default 1).

    Raises:
        InvalidArgumentError: for K < 1.
    """
    k = int(ctx.section(name).get("sample_levels", 1))
    if k < 1:
        raise InvalidArgumentError(f"config.{name}.sample_levels={k} must be >= 1")
    return k


def simple_method(
    ctx: DistillContext,
    cfg: Any,
    *,
    init_state: Callable,
    make_step: Callable,
    saved: dict,
    apply_student: Callable,
    apply_teacher: Callable | None,
    student_model: nn.Module | None = None,
    progress_metric: str = "loss",
) -> Method:
    """A :class:`Method` of one pure ``step(state, teacher_params, batch, key)``.

    The student is the teacher's network started from its weights, or ``student_model``
    (the teacher's with extra inputs) with the teacher's weights grafted onto a fresh init.
    """
    config, mesh, teacher = ctx.config, ctx.mesh, ctx.teacher
    tx = build_optimizer(config.optim)
    ema_rates = tuple(config.train.ema_rates)
    if student_model is None:
        student_model, s_shard = teacher.model, teacher.param_shardings

        def student_params(key, teacher_params):
            del key
            return teacher_params

    else:
        init_boxed = init_params_fn(student_model, teacher.sample_shape, teacher.num_classes)
        s_shard = param_shardings(jax.eval_shape(init_boxed, jax.random.key(0)), mesh)

        def student_params(key, teacher_params):
            return graft_params(teacher_params, nn.unbox(init_boxed(key)))

    def init(key, teacher_params):
        return init_state(key, student_params(key, teacher_params), tx, cfg, ema_rates)

    abstract = jax.eval_shape(init, jax.random.key(0), teacher.params)
    shardings = state_shardings(abstract, s_shard, tx, mesh)
    step = make_step(
        apply_student,
        apply_teacher,
        teacher.formulation,
        cfg,
        tx,
        ema_warmup=bool(config.train.get("ema_warmup", True)),
    )
    rep = replicated(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(shardings, teacher.param_shardings, batch_sharding(mesh), rep),
        out_shardings=(shardings, rep),
        donate_argnums=(0,),
    )
    teacher_params, key = teacher.params, ctx.key

    def run(state, batch, iteration):
        del iteration  # the schedule (stages, rounds, warm-up) follows state.step
        return jitted(state, teacher_params, batch, key)

    return Method(init, shardings, run, saved, student_model, s_shard, progress_metric)


__all__ = [
    "DRIVER_KEYS",
    "DistillContext",
    "Method",
    "method_config",
    "net_apply",
    "recipe",
    "sample_levels",
    "simple_method",
    "state_shardings",
    "stored_config",
]
