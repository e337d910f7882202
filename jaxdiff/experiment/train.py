"""``train_and_evaluate(config, workdir)``: diffusion training from a config.

The run resumes automatically from the newest readable checkpoint in
``workdir/checkpoints`` (params, EMA, optimizer and data-iterator state), so a restarted
job continues the same step count and the same data order. Everything that can be
checked (config values, mesh, dataset, sampler spec and guidance) is checked before the
first step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jaxdiff.data.augment import AUGMENT_LABEL
from jaxdiff.diffusion import Formulation
from jaxdiff.experiment.builders import (
    RUN_KEY,
    Precision,
    build_data,
    build_formulation,
    build_mesh,
    build_model,
    build_optimizer,
    build_precision,
    check_loop_config,
    check_resume,
    latent_metadata,
    lock_workdir,
    run_metadata,
)
from jaxdiff.experiment.evaluate import make_eval_hook
from jaxdiff.experiment.generation import generate_fn
from jaxdiff.experiment.latents import run_vae
from jaxdiff.experiment.loss_terms import build_loss_terms
from jaxdiff.experiment.runs import TrainedModel
from jaxdiff.experiment.sampling import SamplerSpec, resolve_sampler
from jaxdiff.models import DiT
from jaxdiff.parallel import (
    batch_sharding,
    is_main_process,
    make_sharded_generate,
    prefetch_to_mesh,
)
from jaxdiff.training.checkpoint import Checkpointer
from jaxdiff.training.loop import Hook, run_loop
from jaxdiff.training.phema import make_snapshot_fn
from jaxdiff.training.state import TrainState, abstract_state, ema_keys, make_state_fns
from jaxdiff.training.step import jit_train_step, make_train_step
from jaxdiff.training.writers import create_default_writer
from jaxdiff.utils import storage
from jaxdiff.utils.compile_cache import enable_compile_cache
from jaxdiff.utils.images import save_image_grid
from jaxdiff.utils.plots import render_points

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Experiment:
    """Everything a training run needs, built once from the config.

    Attributes:
        mesh: the device mesh.
        model: the network used by the train step (DiT may pin activation shardings).
        formulation: the diffusion formulation.
        tx: the optimizer.
        data: the process-local, checkpointable batch iterator.
        num_classes: classes of the conditional model (0 = unconditional).
        sample_shape: shape of one sample.
        init_fn: ``key -> TrainState``.
        state_shardings: TrainState-shaped tree of NamedShardings.
        train_step: the jitted, sharded, donated step (see :class:`StepBundle`).
        sampler: the run's sampler spec (grids, evaluation), resolved before training.
        view: the run as sampling sees it (plain model, param shardings, mesh).
        seed: the run's seed.
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
    train_step: Callable
    sampler: SamplerSpec
    view: TrainedModel
    seed: int

    def to_model_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Keeps the keys the train step reads (see :func:`model_batch`)."""
        return model_batch(batch, self.num_classes)


def model_batch(batch: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """The keys of a data batch the train step reads (labels only for conditional models)."""
    out = {"image": batch["image"]}
    if num_classes > 0:
        out["label"] = batch["label"]
    if AUGMENT_LABEL in batch:  # what an augmentation did, for a network that sees it
        out[AUGMENT_LABEL] = batch[AUGMENT_LABEL]
    return out


@dataclasses.dataclass
class StepBundle:
    """The exact train step a run executes, with what it needs to run it.

    Attributes:
        mesh: the device mesh.
        model: the network the step runs (DiT may pin activation shardings).
        plain: the same network without activation constraints (for sampling).
        formulation: the diffusion formulation.
        tx: the optimizer.
        num_classes: classes of the conditional model (0 = unconditional).
        sample_shape: shape of one example.
        precision: the numerics preset.
        init_fn: ``key -> TrainState``.
        state_shardings: TrainState-shaped tree of NamedShardings.
        jitted: the jitted, sharded step with the state donated (``.lower`` works).
        step: ``step(state, batch, key) -> (state, metrics)``: ``jitted`` called under
            the preset's matmul precision; ``batch`` holds global arrays split with
            :func:`jaxdiff.parallel.batch_sharding`.
    """

    mesh: Mesh
    model: nn.Module
    plain: nn.Module
    formulation: Formulation
    tx: optax.GradientTransformation
    num_classes: int
    sample_shape: tuple[int, ...]
    precision: Precision
    init_fn: Callable[[jax.Array], TrainState]
    state_shardings: Any
    jitted: Callable
    step: Callable


def build_train_step(
    config: ml_collections.ConfigDict,
    num_classes: int,
    sample_shape: tuple[int, ...],
    mesh: Mesh | None = None,
) -> StepBundle:
    """Builds the jitted, sharded, donated train step of ``config`` (no data needed).

    Training and ``benchmarks/train_step.py`` both run this step, so a benchmark times
    exactly what a run executes: model options (``config.model``: dtype, remat,
    scan_blocks, attention_impl), ``config.precision``, optimizer, EMA and mesh.

    Args:
        config: an experiment config.
        num_classes: classes of the conditional model (0 = unconditional).
        sample_shape: shape of one example, e.g. ``(32, 32, 4)``.
        mesh: the mesh (default: :func:`build_mesh` of ``config``).

    Raises:
        InvalidArgumentError: for an inconsistent config.
    """
    mesh = build_mesh(config) if mesh is None else mesh
    precision = build_precision(config)
    plain = build_model(config, num_classes)
    formulation, tx = build_formulation(config), build_optimizer(config.optim)
    model = plain
    if isinstance(plain, DiT) and (mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1):
        # Keep transformer activations batch-sharded between blocks (see DiT's docstring).
        model = plain.clone(activation_sharding=batch_sharding(mesh))
    tc = config.train
    init_fn, shardings = make_state_fns(
        plain,
        tx,
        mesh,
        sample_shape,
        num_classes,
        tuple(tc.ema_rates),
        tuple(tc.get("ema_stds", ())),
    )
    step_fn = make_train_step(
        model,
        formulation,
        tx,
        num_classes=num_classes,
        label_dropout=tc.label_dropout,
        ema_warmup=tc.ema_warmup,
        terms=build_loss_terms(config, model, num_classes, tuple(sample_shape)),
    )
    jitted = jit_train_step(step_fn, shardings, mesh)

    def step(state, batch, key):
        with precision.scope():  # the matmul precision is part of what jit traces
            return jitted(state, batch, key)

    return StepBundle(
        mesh=mesh,
        model=model,
        plain=plain,
        formulation=formulation,
        tx=tx,
        num_classes=num_classes,
        sample_shape=tuple(sample_shape),
        precision=precision,
        init_fn=init_fn,
        state_shardings=shardings,
        jitted=jitted,
        step=step,
    )


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Builds mesh, data, model, formulation, optimizer, state functions and sampler.

    Raises:
        InvalidArgumentError: for an inconsistent config (named value and fix in the message).
    """
    check_loop_config(config)
    enable_compile_cache(config.get("compile_cache_dir"))
    mesh = build_mesh(config)
    source, data, num_classes = build_data(config)
    sample_shape = tuple(source.info.image_shape)
    sampler = resolve_sampler(config.sample, num_classes=num_classes)
    bundle = build_train_step(config, num_classes, sample_shape, mesh)
    view = TrainedModel(
        config=config,
        model=bundle.plain,
        formulation=bundle.formulation,
        params=None,
        num_classes=num_classes,
        sample_shape=sample_shape,
        step=0,
        mesh=mesh,
        param_shardings=bundle.state_shardings.params,
        latent=latent_metadata(source),
    )
    return Experiment(
        mesh=mesh,
        model=bundle.model,
        formulation=bundle.formulation,
        tx=bundle.tx,
        data=data,
        num_classes=num_classes,
        sample_shape=sample_shape,
        init_fn=bundle.init_fn,
        state_shardings=bundle.state_shardings,
        train_step=bundle.step,
        sampler=sampler,
        view=view,
        seed=int(config.seed),
    )


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
    log.info("resumed from %s in %s", ckpt.last_restore.describe(), ckpt.directory)
    return state, step


def first_ema(ema_rates: Any, ema_stds: Any = ()) -> Callable[[TrainState], Any]:
    """``state -> params`` of the first EMA rate, power profile (``std``) or the raw params."""
    keys = ema_keys(ema_rates, ema_stds)
    key = keys[0] if keys else None
    return lambda state: state.ema[key] if key is not None else state.params


def make_grid_hook(
    config: ml_collections.ConfigDict,
    view: TrainedModel,
    spec: SamplerSpec,
    params_of: Callable[[Any], Any],
    workdir: str,
    name: str = "step_{step:06d}.png",
) -> Hook | None:
    """Writes ``config.sample.grid_size`` samples to ``workdir/samples`` (None if 0).

    Runs every ``config.train.sample_every`` steps (0 = at the end only); 2-D toy points
    are rendered as a density image.
    """
    num = int(config.sample.grid_size)
    if num <= 0:
        return None
    draw = make_sharded_generate(
        generate_fn(view, spec),
        mesh=view.mesh,
        num=num,
        labels=np.arange(num) % max(view.num_classes, 1),
        batch_size=num,
        param_shardings=view.param_shardings,
    )

    vae = run_vae(view, config.get("vae", {}).get("path"))

    def write(step: int, state: Any) -> None:
        images = draw(params_of(state), int(config.seed) + 1).samples
        if len(view.sample_shape) == 1:  # 2-D toy points: a density image instead
            images = render_points(images)[None]
        if is_main_process():
            path = storage.join(workdir, "samples", name.format(step=step))
            decode = None if vae is None else vae.decode
            save_image_grid(path, images, scale=int(config.sample.grid_scale), decode=decode)
            log.info("wrote samples to %s", path)

    return Hook("samples", int(config.train.get("sample_every", 0)), write)


def make_phema_hook(config: ml_collections.ConfigDict, workdir: str) -> Hook | None:
    """Snapshots the ``config.train.ema_stds`` profiles to ``workdir/phema`` (None if off).

    Runs every ``config.train.phema_every`` steps and at the last step, on every process
    (the params are gathered), writing from process 0; see :mod:`jaxdiff.training.phema`.
    """
    every = int(config.train.get("phema_every", 0))
    if every <= 0:
        return None
    stds = tuple(config.train.ema_stds)
    return Hook("phema", every, make_snapshot_fn(storage.join(workdir, "phema"), stds))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TrainState:
    """Trains a diffusion model as ``config`` says, checkpointing and sampling in ``workdir``.

    Args:
        config: an experiment config (see ``train/configs/digits.py``).
        workdir: where checkpoints, metrics and sample grids go; reused to resume.

    Returns:
        The final :class:`~jaxdiff.training.state.TrainState`.

    Raises:
        InvalidArgumentError: for a bad config value (the message names it and the fix).
        FloatingPointError: if the loss becomes non-finite.
    """
    exp = build_experiment(config)
    tc = config.train
    params_of = first_ema(tc.ema_rates, tc.get("ema_stds", ()))
    workdir = storage.to_str(workdir)
    hooks = [
        make_phema_hook(config, workdir),
        make_grid_hook(config, exp.view, exp.sampler, params_of, workdir),
        make_eval_hook(config, exp.view, exp.sampler, params_of),
    ]
    with contextlib.ExitStack() as stack:
        # Grids and evaluation sample under the same matmul precision as the step.
        stack.enter_context(build_precision(config).scope())
        stack.enter_context(lock_workdir(workdir))
        ckpt = stack.enter_context(
            Checkpointer(
                storage.join(workdir, "checkpoints"),
                max_to_keep=tc.keep_checkpoints,
                quarantine=True,
            )
        )
        state, start = init_state(exp, ckpt)
        check_resume(ckpt, start, tc.num_steps)
        writer = create_default_writer(workdir, just_logging=not is_main_process())
        stack.callback(writer.close)
        stack.callback(writer.flush)
        stack.callback(exp.data.close)  # stops input worker processes at once
        # Two global batches wait on the devices, so the host-to-device copy of the next
        # batch overlaps the current step; its state is that of the next unused batch.
        batches = prefetch_to_mesh(exp.data, exp.mesh, size=2, transform=exp.to_model_batch)
        batches.start_prefetch()  # input workers start up while the step compiles
        if start == 0:
            writer.write_hparams(config.to_dict())
        key = jax.random.key(config.seed)
        meta = run_metadata(exp.num_classes, exp.sample_shape, exp.view.latent)
        saved_config = {**config.to_dict(), RUN_KEY: meta}

        def step_fn(state, step):
            del step  # the step's randomness comes from state.step inside the train step
            return exp.train_step(state, next(batches), key)

        def save(step, state):
            ckpt.save(step, state, data_state=batches.get_state(), config=saved_config)

        return run_loop(
            state,
            step_fn,
            start=start,
            num_steps=tc.num_steps,
            log_every=tc.log_every,
            checkpoint_every=tc.checkpoint_every,
            save=save,
            checkpointers=[ckpt],
            writer=writer,
            hooks=[h for h in hooks if h is not None],
            examples_per_step=tc.batch_size,
        )


__all__ = [
    "Experiment",
    "StepBundle",
    "build_train_step",
    "build_experiment",
    "first_ema",
    "init_state",
    "make_grid_hook",
    "model_batch",
    "make_phema_hook",
    "train_and_evaluate",
]
