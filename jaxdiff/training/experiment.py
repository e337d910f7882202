"""Builds a training run's pieces from a config: the one place a ConfigDict is read."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jaxdiff.data import get_dataset, make_iterator
from jaxdiff.diffusion import Formulation, get_formulation, karras_sigmas
from jaxdiff.generate import make_generate_fn, sample_keys_for
from jaxdiff.guidance import parse_guidance
from jaxdiff.models import DiT, create_model
from jaxdiff.parallel import (
    batch_sharding,
    batch_size_per_device_check,
    make_mesh,
    param_shardings,
    replicated,
)
from jaxdiff.samplers import get_solver
from jaxdiff.training.checkpoint import Checkpointer
from jaxdiff.training.optim import make_optimizer
from jaxdiff.training.state import TrainState, create_train_state, ema_key
from jaxdiff.utils.plots import render_points

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built once from the config.

    Attributes:
        mesh: the device mesh.
        model: the network.
        formulation: the diffusion formulation.
        tx: the optimizer.
        data: the process-local, checkpointable batch iterator.
        num_classes: classes of the conditional model (0 = unconditional).
        sample_shape: shape of one sample.
        init_fn: ``key -> TrainState``.
        state_shardings: TrainState-shaped tree of NamedShardings.
        sample_grid: ``state -> images [N, H, W, C]`` in [-1, 1], for progress grids.
        grid_scale: nearest-neighbour upscaling of saved grids (8x8 digits are tiny).
    """

    mesh: Mesh
    model: nn.Module
    formulation: Formulation
    tx: optax.GradientTransformation
    data: Iterator
    num_classes: int
    sample_shape: tuple[int, ...]
    init_fn: Callable[[jax.Array], TrainState]
    state_shardings: Any
    sample_grid: Callable[[TrainState], jax.Array]
    grid_scale: int
    seed: int
    evaluate: Callable[[TrainState], dict[str, float]] | None = None

    def to_model_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Keeps the keys the train step reads (labels only for conditional models)."""
        out = {"image": batch["image"]}
        if self.num_classes > 0:
            out["label"] = batch["label"]
        return out


def _model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    kwargs = config.model.to_dict()
    kwargs.pop("name")
    for k, v in list(kwargs.items()):
        if isinstance(v, list):
            kwargs[k] = tuple(v)
    return kwargs


def _state_shardings(abstract: TrainState, p_shard: Any, tx, mesh: Mesh) -> TrainState:
    rep = replicated(mesh)
    opt_shard = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract.opt_state,
        p_shard,
        transform_non_params=lambda _: rep,
    )
    return TrainState(
        step=rep, params=p_shard, ema={k: p_shard for k in abstract.ema}, opt_state=opt_shard
    )


def build_sampler_settings(config: ml_collections.ConfigDict):
    """Returns ``(solver, sigmas, guidance)`` from ``config.sample``."""
    sc = config.sample
    sigmas = karras_sigmas(sc.steps, sc.sigma_min, sc.sigma_max, sc.rho)
    return get_solver(sc.solver), sigmas, parse_guidance(sc.guidance)


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Builds mesh, data, model, formulation, optimizer, initial-state function and grids.

    Raises:
        ValueError: for an inconsistent config (named value and fix in the message).
    """
    tc = config.train
    for name in ("num_steps", "batch_size", "log_every", "checkpoint_every"):
        if tc[name] < 1:
            raise ValueError(f"config.train.{name} must be >= 1, got {tc[name]}")
    mesh = make_mesh(**config.mesh.to_dict())
    batch_size_per_device_check(tc.batch_size, mesh)
    source = get_dataset(config.data.name, split="train", data_dir=config.data.data_dir)
    info = source.info
    num_classes = (info.num_classes or 0) if config.data.conditional else 0
    if config.data.conditional and not info.num_classes:
        raise ValueError(
            f"config.data.conditional=True but dataset {config.data.name!r} has no labels: "
            "set --config.data.conditional=False"
        )
    data = make_iterator(
        source,
        global_batch_size=tc.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    model, formulation, tx = build_model_parts(config, num_classes)
    sample_shape = tuple(info.image_shape)
    plain_model = model
    if isinstance(model, DiT) and (mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1):
        # Keep transformer activations batch-sharded between blocks (see DiT's docstring).
        model = model.clone(activation_sharding=batch_sharding(mesh))
    init_fn, state_shardings = make_state_fns(
        plain_model, tx, mesh, sample_shape, num_classes, tuple(tc.ema_rates)
    )
    sample_grid = _make_grid_fn(config, plain_model, formulation, num_classes, sample_shape)
    return Experiment(
        mesh=mesh,
        model=model,
        formulation=formulation,
        tx=tx,
        data=data,
        num_classes=num_classes,
        sample_shape=sample_shape,
        init_fn=init_fn,
        state_shardings=state_shardings,
        sample_grid=sample_grid,
        grid_scale=int(config.sample.grid_scale),
        seed=int(config.seed),
        evaluate=_make_eval_fn(
            config, plain_model, formulation, mesh, num_classes, sample_shape, state_shardings
        ),
    )


def build_model_parts(
    config: ml_collections.ConfigDict, num_classes: int
) -> tuple[nn.Module, Formulation, optax.GradientTransformation]:
    """Builds the model, formulation and optimizer a config describes."""
    model = create_model(config.model.name, num_classes=num_classes, **_model_kwargs(config))
    formulation = get_formulation(config.formulation.name, **_formulation_kwargs(config))
    return model, formulation, make_optimizer(**config.optim.to_dict())


def make_state_fns(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    sample_shape: tuple[int, ...],
    num_classes: int,
    ema_rates: tuple[float, ...],
) -> tuple[Callable[[jax.Array], TrainState], TrainState]:
    """Returns ``init_fn(key) -> TrainState`` and the state's shardings on ``mesh``."""
    x = jnp.zeros((1, *sample_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    c = jnp.zeros((1,), jnp.int32) if num_classes else None

    def boxed_init(key):
        return model.init({"params": key, "dropout": key}, x, t, c)["params"]

    def init_fn(key):
        return create_train_state(nn.unbox(boxed_init(key)), tx, ema_rates)

    key = jax.random.key(0)
    p_shard = param_shardings(jax.eval_shape(boxed_init, key), mesh)
    return init_fn, _state_shardings(jax.eval_shape(init_fn, key), p_shard, tx, mesh)


def abstract_state(init_fn: Callable, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs of the state with target shardings, for restoring onto a mesh."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(init_fn, jax.random.key(0)),
        shardings,
    )


def run_metadata(exp: Experiment) -> dict[str, Any]:
    """What sampling needs to rebuild the model without opening the dataset."""
    return {"num_classes": exp.num_classes, "sample_shape": list(exp.sample_shape)}


def _formulation_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    kwargs = config.formulation.to_dict()
    kwargs.pop("name")
    return kwargs


def _make_grid_fn(config, model, formulation, num_classes, sample_shape):
    solver, sigmas, guidance = build_sampler_settings(config)
    if num_classes == 0:
        guidance = None
    num = int(config.sample.grid_size)
    generate = jax.jit(
        make_generate_fn(
            model,
            formulation,
            solver=solver,
            sigmas=sigmas,
            guidance=guidance,
            sample_shape=sample_shape,
            num_classes=num_classes,
        )
    )
    rate = ema_key(config.train.ema_rates[0]) if config.train.ema_rates else None
    labels = jnp.arange(num) % max(num_classes, 1)
    keys = sample_keys_for(jax.random.key(config.seed + 1), 0, num)

    def sample_grid(state: TrainState) -> jax.Array:
        params = state.ema[rate] if rate is not None else state.params
        images, _ = generate(params, labels, keys)
        if len(sample_shape) == 1:  # 2-D toy points: render a density image instead
            return render_points(np.asarray(images))[None]
        return images

    return sample_grid


def _make_eval_fn(config, model, formulation, mesh, num_classes, sample_shape, shardings):
    """In-loop evaluation of the first EMA's samples, or None when ``config.eval`` is off."""
    ec = config.get("eval")
    if ec is None or not ec.name or not ec.every:
        return None
    from jaxdiff.metrics import get_evaluator, make_sample_and_evaluate_fn

    kwargs = {"dataset": config.data.name} if ec.name == "toy" else {}
    solver, sigmas, guidance = build_sampler_settings(config)
    rate = ema_key(config.train.ema_rates[0]) if config.train.ema_rates else None
    fn = make_sample_and_evaluate_fn(
        model,
        formulation,
        get_evaluator(ec.name, **kwargs),
        mesh=mesh,
        num=int(ec.num),
        solver=solver,
        sigmas=sigmas,
        guidance=guidance if num_classes else None,
        sample_shape=sample_shape,
        num_classes=num_classes,
        batch_size=int(ec.batch_size),
        param_shardings=shardings.ema[rate] if rate else shardings.params,
    )

    def evaluate(state: TrainState) -> dict[str, float]:
        params = state.ema[rate] if rate else state.params
        return fn(params, config.seed + 2).metrics

    return evaluate


def init_state(exp: Experiment, ckpt: Checkpointer) -> tuple[TrainState, int]:
    """Restores the newest readable checkpoint, or initialises a fresh state.

    Returns:
        ``(state, step)`` with ``step = 0`` for a fresh run.
    """
    if ckpt.latest_step() is None:
        init = jax.jit(exp.init_fn, out_shardings=exp.state_shardings)
        return init(jax.random.key(exp.seed)), 0
    state, data_state, step = ckpt.restore(abstract_state(exp.init_fn, exp.state_shardings))
    if data_state is not None:
        exp.data.set_state(data_state)
    log.info("resumed from step %d in %s", step, ckpt.directory)
    return state, step
