"""Samples from loaded runs: the plain sampler and diversity distillation's hybrid.

Both build a ``generate(params, labels, keys)`` function and hand it to the one sharded
batching loop, :func:`jaxdiff.parallel.make_sharded_generate`: sample ``j`` is seeded by
``fold_in(key(seed), j)``, so the same seed gives the same images at any batch size or
device count.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.distill.hybrid import make_hybrid_generate_fn
from jaxdiff.distill.meanflow import MeanFlowConfig, denoiser_velocity, sample_meanflow
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.runs import TrainedModel
from jaxdiff.experiment.sampling import MEANFLOW, RENOISE, SamplerSpec, trained_levels
from jaxdiff.generate import class_conditions, make_generate_fn
from jaxdiff.parallel import make_sharded_generate
from jaxdiff.utils.rng import start_noise


def generate_fn(run: TrainedModel, spec: SamplerSpec) -> Callable[..., tuple[jax.Array, dict]]:
    """``generate(params, labels, keys) -> (samples, aux)`` of a run and a sampler spec.

    A MeanFlow student's own recipe (solver ``meanflow``) runs its average-velocity jumps
    (:func:`meanflow_generate_fn`); every other spec runs the scan sampler.
    """
    if spec.solver_name == MEANFLOW:
        return meanflow_generate_fn(run, spec)
    return make_generate_fn(
        run.model,
        run.formulation,
        solver=spec.solver,
        sigmas=spec.sigmas,
        guidance=spec.guidance,
        sample_shape=run.sample_shape,
        num_classes=run.num_classes,
        model_kwargs=spec.model_kwargs,
    )


def meanflow_generate_fn(run: TrainedModel, spec: SamplerSpec) -> Callable[..., tuple]:
    """``generate(params, labels, keys)`` of a MeanFlow student over ``spec.sigmas``.

    The levels are EDM sigmas; the jumps run between their flow times ``t = s / (1 + s)``
    from ``z = t_0 noise`` (the EDM start ``x = s_0 noise``) down to ``t = 0``, with ``u``
    read through the run's formulation (:func:`jaxdiff.distill.meanflow.denoiser_velocity`).
    Deterministic: one network evaluation per level, no guidance.
    """
    if spec.guidance is not None:
        raise InvalidArgumentError(
            f"guidance {spec.guidance_spec!r}: a MeanFlow student samples unguided; pass "
            "--guidance=none"
        )
    sigmas = np.asarray(spec.sigmas, np.float64)
    times = tuple(float(s / (1.0 + s)) for s in sigmas)

    def net(params, *args, **kwargs):
        return run.model.apply({"params": params}, *args, **kwargs)

    apply = denoiser_velocity(net, run.formulation)
    cfg = MeanFlowConfig(label_scale=1.0)

    def generate(params, labels, keys):
        cond, _ = class_conditions(labels, run.num_classes)
        noise = start_noise(keys, run.sample_shape)
        x = sample_meanflow(apply, params, times[0] * noise, cond, cfg=cfg, times=times)
        return x, {"nfe": jnp.int32(len(times) - 1)}

    return generate


def _draw(generate, params, shardings, mesh, *, num, labels, seed, batch_size):
    run = make_sharded_generate(
        generate,
        mesh=mesh,
        num=num,
        labels=labels,
        batch_size=batch_size,
        param_shardings=shardings,
    )
    out = run(params, seed)
    return out.samples, out.nfe


def generate_samples(
    run: TrainedModel,
    spec: SamplerSpec,
    *,
    num: int,
    labels: np.ndarray,
    seed: int,
    batch_size: int = 256,
) -> tuple[np.ndarray, int]:
    """Draws ``num`` samples on the run's mesh, the batch split over its batch axes.

    Args:
        run: a loaded run (:func:`jaxdiff.experiment.load_run`).
        spec: the sampler (:func:`jaxdiff.experiment.resolve_sampler`).
        num: number of samples.
        labels: ``[num]`` labels (:func:`jaxdiff.experiment.parse_labels`).
        seed: sample ``j`` uses ``fold_in(key(seed), j)``.
        batch_size: global samples per compiled call.

    Returns:
        ``(samples [num, ...] float32, network evaluations per sample)``.
    """
    return _draw(
        generate_fn(run, spec),
        run.params,
        run.param_shardings,
        run.mesh,
        num=num,
        labels=labels,
        seed=seed,
        batch_size=batch_size,
    )


def student_levels(student: TrainedModel) -> np.ndarray:
    """A distilled student's trained input levels (``[sigma_max]`` for a one-step student).

    Raises:
        InvalidArgumentError: if ``student`` is not a few-step student run.
    """
    levels = trained_levels(student.config)
    if levels is not None and str(student.config.sample.solver).strip().lower() != RENOISE:
        raise InvalidArgumentError(
            f"--student: the hybrid sampler hands over to a re-noising student (solver "
            f"'renoise'), and this one samples with {student.config.sample.solver!r}; pass an "
            "f-distill, CT or sCM student"
        )
    if levels is None:
        raise InvalidArgumentError(
            "--student must be a few-step distilled student (its config.sample.sigmas holds "
            "the levels it was trained at), e.g. the workdir of `python -m train "
            "--config=train/configs/distill_digits.py`; this run has none"
        )
    return levels


def hybrid_generate_samples(
    base: TrainedModel,
    student: TrainedModel,
    spec: SamplerSpec,
    *,
    switch_step: int,
    num: int,
    labels: np.ndarray,
    seed: int,
    batch_size: int = 256,
) -> tuple[np.ndarray, int]:
    """:func:`generate_samples` for the hybrid sampler: ``base`` first, then ``student``.

    Both runs must be loaded onto the same mesh. The base phase uses ``spec`` (solver,
    sigmas, guidance) for ``switch_step`` steps, its last step landing on the student's
    highest trained level at or below ``spec.sigmas[switch_step]``; the student then
    finishes unguided with its re-noising recipe over its trained levels from there
    (:func:`jaxdiff.distill.hybrid.handover`), so it only runs where it was trained.

    Raises:
        InvalidArgumentError: if the runs' sample shapes or meshes differ, ``student`` is
            not a few-step student, or ``spec.sigmas[switch_step]`` lies below all of its
            trained levels (a one-step student only takes ``switch_step = 0``).
    """
    if base.sample_shape != student.sample_shape:
        raise InvalidArgumentError(
            f"base and student sample shapes differ: {base.sample_shape} vs "
            f"{student.sample_shape}: pass the student distilled from this base run"
        )
    if base.mesh != student.mesh:  # equal devices and axes (meshes are also interned)
        raise InvalidArgumentError("load the base and the student runs onto the same mesh")
    generate = make_hybrid_generate_fn(
        (base.model, base.formulation),
        (student.model, student.formulation),
        solver=spec.solver,
        sigmas=spec.sigmas,
        switch_step=switch_step,
        student_levels=student_levels(student),
        guidance=spec.guidance,
        sample_shape=base.sample_shape,
        num_classes=base.num_classes,
    )
    return _draw(
        generate,
        (base.params, student.params),
        (base.param_shardings, student.param_shardings),
        base.mesh,
        num=num,
        labels=labels,
        seed=seed,
        batch_size=batch_size,
    )


__all__ = [
    "generate_fn",
    "generate_samples",
    "hybrid_generate_samples",
    "meanflow_generate_fn",
    "student_levels",
]
