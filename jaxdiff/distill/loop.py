"""``distill_and_evaluate(config, workdir)``: distils a trained run into a few-step student.

The config (``train/configs/distill_digits.py``) is read here only. The teacher is a
training workdir (``config.teacher``) restored with :func:`jaxdiff.inference.load_run`;
its data set supplies the "real" images of the discriminator.

``workdir`` gets two checkpoint directories:

* ``checkpoints/``: the *student* as an ordinary run, a TrainState of the generator
  (params, EMA, optax state) with the teacher's model config, the generator's optimizer
  config, a sampling section for one step (Euler from ``sigma_max``: the sample is
  ``G(sigma_max z)``) and the run metadata, so ``load_run`` and ``python -m sample
  --workdir=STUDENT --steps=1`` work unchanged;
* ``distill_state/``: the whole :class:`~jaxdiff.distill.fdistill.DistillState` and the
  data iterator, from which a restarted job resumes.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.data import get_dataset, make_iterator
from jaxdiff.distill.fdistill import (
    FDistillConfig,
    distill_state_shardings,
    init_distill_state,
    is_generator_step,
    jit_steps,
    make_steps,
)
from jaxdiff.distill.few_step import active_steps, few_step_sample, student_sigmas
from jaxdiff.distill.nets import make_unet_nets
from jaxdiff.inference import load_run
from jaxdiff.parallel import (
    batch_size_per_device_check,
    global_batch,
    is_main_process,
    make_mesh,
)
from jaxdiff.training.checkpoint import Checkpointer
from jaxdiff.training.experiment import make_state_fns
from jaxdiff.training.loop import RUN_KEY, StopSignal
from jaxdiff.training.optim import make_optimizer
from jaxdiff.training.writers import create_default_writer, progress
from jaxdiff.utils.images import save_image_grid

log = logging.getLogger(__name__)


def fdistill_config(config: ml_collections.ConfigDict, teacher_sample: Any) -> FDistillConfig:
    """The :class:`FDistillConfig` of ``config.distill`` on the teacher's sigma range."""
    d = config.distill
    sigmas = student_sigmas(
        d.student_steps, teacher_sample.sigma_min, teacher_sample.sigma_max, teacher_sample.rho
    )
    return FDistillConfig(
        divergence=d.divergence,
        gan_weight=d.gan_weight,
        disc_weight=d.disc_weight,
        gan_loss=d.gan_loss,
        r1_weight=d.r1_weight,
        num_time_bins=d.num_time_bins,
        bin_ema=d.bin_ema,
        sigma_min=teacher_sample.sigma_min,
        sigma_max=teacher_sample.sigma_max,
        rho=teacher_sample.rho,
        gen_t_range=tuple(d.gen_t_range),
        fake_t_range=tuple(d.fake_t_range),
        disc_t_range=tuple(d.disc_t_range),
        student_sigmas=tuple(float(s) for s in sigmas),
        extractor=d.extractor,
        num_heads=d.num_heads,
        head_kinds=tuple(d.head_kinds),
        num_groups=d.num_groups,
        heads_per_step=d.heads_per_step,
        refresh_fraction=d.refresh_fraction,
    )


def student_config(config: ml_collections.ConfigDict, teacher_config: Any, meta: dict) -> dict:
    """The config stored beside the student's checkpoints (what ``load_run`` reads)."""
    out = teacher_config.to_dict()
    out["optim"] = config.optim.to_dict()
    out["train"] = {**out["train"], "ema_rates": tuple(config.train.ema_rates)}
    out["sample"] = {
        **out["sample"],
        "solver": "euler",
        "steps": int(config.distill.student_steps),
        "guidance": "none",
    }
    out["distill_config"] = config.to_dict()
    out[RUN_KEY] = meta
    return out


def distill_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> Any:
    """Distils ``config.teacher`` into a student in ``workdir`` (resumes if it can).

    Args:
        config: a distillation config (``method = "distill"``).
        workdir: where the student checkpoints, metrics and grids go.

    Returns:
        The final :class:`~jaxdiff.distill.fdistill.DistillState`.

    Raises:
        ValueError: for a missing teacher or bad values (the message names the fix).
    """
    if not config.get("teacher"):
        raise ValueError(
            "no teacher: pass --config.teacher=WORKDIR, the workdir of a trained run "
            "(e.g. `python -m train --workdir=runs/digits` first)"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tc, d = config.train, config.distill
    for name in ("num_steps", "batch_size", "log_every", "checkpoint_every"):
        if tc[name] < 1:
            raise ValueError(f"config.train.{name} must be >= 1, got {tc[name]}")
    teacher = load_run(
        config.teacher, ema=None if config.teacher_ema == "none" else config.teacher_ema
    )
    mesh = make_mesh(**config.mesh.to_dict())
    batch_size_per_device_check(tc.batch_size, mesh)
    dc = teacher.config.data
    source = get_dataset(dc.name, split="train", data_dir=dc.get("data_dir"))
    data = make_iterator(
        source,
        global_batch_size=tc.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    cfg = fdistill_config(config, teacher.config.sample)
    nets = make_unet_nets(
        teacher.model,
        teacher.formulation,
        cfg,
        num_classes=teacher.num_classes,
        sample_shape=teacher.sample_shape,
        teacher_params_example=teacher.params,
        feature_names=tuple(d.feature_names),
        head_width=d.head_width,
        teacher_guidance=d.teacher_guidance,
    )
    tx_gen = make_optimizer(**config.optim.to_dict())
    txs = (
        tx_gen,
        make_optimizer(**config.critic_optim.to_dict()),
        make_optimizer(**config.critic_optim.to_dict()),
    )
    _, gen_shardings = make_state_fns(
        teacher.model,
        tx_gen,
        mesh,
        teacher.sample_shape,
        teacher.num_classes,
        tuple(tc.ema_rates),
    )
    p_shard = gen_shardings.params
    teacher_params = jax.device_put(teacher.params, p_shard)

    def init_fn(key):
        return init_distill_state(
            teacher_params, teacher_params, nets.init_pool(key), txs, cfg, tuple(tc.ema_rates)
        )

    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    shardings = distill_state_shardings(abstract, p_shard, txs, mesh)
    full_ckpt = Checkpointer(workdir / "distill_state", max_to_keep=tc.keep_checkpoints)
    student_ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=tc.keep_checkpoints)
    if full_ckpt.latest_step() is None:
        state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.seed + 7))
        start = 0
    else:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        state, data_state, start = full_ckpt.restore(target)
        if data_state is not None:
            data.set_state(data_state)
        log.info("resumed distillation from step %d in %s", start, workdir)
    gen_step, critic_step = jit_steps(make_steps(nets, cfg, txs), shardings, p_shard, mesh)
    meta = {"num_classes": teacher.num_classes, "sample_shape": list(teacher.sample_shape)}
    saved = student_config(config, teacher.config, meta)
    writer = create_default_writer(workdir, just_logging=not is_main_process())
    if start == 0:
        writer.write_hparams(config.to_dict())
    key = jax.random.key(config.seed)
    stop = StopSignal(signals=(signal.SIGTERM,) if jax.process_count() == 1 else ())
    bar = progress(tc.num_steps, start)
    window: list[dict[str, Any]] = []
    t_last, step_last = time.perf_counter(), start
    labels_needed = teacher.num_classes > 0
    try:
        for step in range(start + 1, tc.num_steps + 1):
            raw = next(data)
            local = {"image": raw["image"]}
            if labels_needed:
                local["label"] = raw["label"]
            batch = global_batch(local, mesh)
            gen_updates = (step - 1) // (d.critic_steps + 1)
            num_active = active_steps(gen_updates, d.refine_stage_steps, d.student_steps)
            if is_generator_step(step - 1, d.critic_steps):
                state, metrics = gen_step(state, teacher_params, batch, key, num_active)
            else:
                state, metrics = critic_step(state, teacher_params, batch, key, num_active)
            window.append(metrics)
            is_last = step == tc.num_steps
            if step % tc.log_every == 0 or is_last:
                scalars = _mean_metrics(window)
                window.clear()
                bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
                if bad:
                    raise FloatingPointError(f"non-finite metrics at step {step}: {bad}")
                scalars["steps_per_s"] = (step - step_last) / (time.perf_counter() - t_last)
                t_last, step_last = time.perf_counter(), step
                writer.write_scalars(step, scalars)
                bar.update(step, loss=scalars.get("gen_loss", scalars.get("critic_loss", 0.0)))
            preempted = stop.received is not None or full_ckpt.reached_preemption(step)
            if step % tc.checkpoint_every == 0 or is_last or preempted:
                full_ckpt.save(step, state, data_state=data.get_state(), config=saved)
                student_ckpt.save(step, state.gen, config=saved)
            if preempted:
                log.warning("stopping at step %d on a preemption signal; rerun to resume", step)
                break
        bar.close()
        if config.sample.grid_size > 0:
            _write_grid(config, teacher, nets, cfg, state, workdir)
    finally:
        stop.restore()
        full_ckpt.wait_until_finished()
        student_ckpt.wait_until_finished()
        full_ckpt.close()
        student_ckpt.close()
        writer.flush()
        writer.close()
    return state


def _mean_metrics(window: list[dict[str, Any]]) -> dict[str, float]:
    stacked = jax.device_get(window)
    keys = sorted({k for m in stacked for k in m})
    return {k: float(np.mean([m[k] for m in stacked if k in m])) for k in keys}


def _write_grid(config, teacher, nets, cfg, state, workdir: Path) -> None:
    num = int(config.sample.grid_size)
    params = state.gen.ema[next(iter(state.gen.ema))] if state.gen.ema else state.gen.params
    noise = jax.random.normal(jax.random.key(config.seed + 1), (num, *teacher.sample_shape))
    labels = jnp.arange(num) % max(teacher.num_classes, 1) if teacher.num_classes else None

    def gen(p, x, sigma, c):
        return nets.student(p, x, sigma, c)[0]

    images = jax.jit(
        lambda p, z, c: few_step_sample(gen, p, z, c, cfg.student_sigmas, jax.random.key(0))
    )(params, noise, labels)
    if is_main_process():
        path = workdir / "samples" / "student.png"
        save_image_grid(path, np.asarray(images), scale=int(config.sample.grid_scale))
        log.info("wrote student samples to %s", path)


__all__ = ["distill_and_evaluate", "fdistill_config", "student_config"]
