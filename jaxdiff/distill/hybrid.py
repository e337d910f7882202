"""Diversity distillation (Gandikota & Bau 2025): the base model first, the student after.

The distilled student has lost diversity mostly in the first, high-noise steps, where the
sample's layout is decided. The hybrid sampler runs the **base** (teacher) model with its
solver for the first ``switch_step`` steps, then hands ``x`` to the **student**, which
finishes exactly as it was trained: the re-noising recipe over its own levels
(:class:`jaxdiff.samplers.Renoise`).

The student is only ever called at a level it was trained on. The rule
(:func:`handover`): let ``s*`` be the student's highest trained level at or below the
base's ``sigmas[switch_step]``. The base takes ``switch_step`` steps over
``sigmas[:switch_step]`` and its last step lands on ``s*`` instead of
``sigmas[switch_step]`` (same number of base evaluations); the student then continues from
``s*`` over its trained levels ``s* > ... > s_{K-1}``, re-noising between them.
``switch_step = 0`` is the student alone, its whole recipe from its first level. When
``sigmas[switch_step]`` lies below the student's lowest trained level (a one-step
student, trained at ``sigma_max`` only, for any ``switch_step > 0``), it raises instead of
calling the student where it was not trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.formulation import Cond, Denoiser, Formulation
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.generate import class_conditions, model_denoiser
from jaxdiff.guidance.base import Guidance
from jaxdiff.samplers import Solver, renoise
from jaxdiff.samplers.base import batch_keys
from jaxdiff.samplers.driver import sample
from jaxdiff.utils.rng import start_noise

STUDENT_KEY_TAG = 0x5D7
"""After base steps, the student's re-noising keys are ``fold_in(keys[b], tag)``, never the
base's step keys (``switch_step = 0`` uses ``keys`` as the student's own sampler does)."""


def handover(sigmas: Any, switch_step: int, levels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Where the base stops and the student starts (the module docstring's rule).

    Args:
        sigmas: the base schedule ``[N + 1]``.
        switch_step: base steps before the student, ``0 <= switch_step < N``.
        levels: the student's ``[K]`` decreasing trained levels.

    Returns:
        ``(base_sigmas, student_sigmas)``: the base's ``[switch_step + 1]`` levels ending on
        the student's first level ``s*`` (empty for ``switch_step = 0``), and the
        student's levels from ``s*`` followed by 0 (the ``renoise`` schedule).

    Raises:
        InvalidArgumentError: for ``switch_step`` outside ``[0, N)``, no trained levels, or
            a ``sigmas[switch_step]`` below every trained level (the message says which
            ``switch_step`` values work).
    """
    sigmas = np.asarray(sigmas, np.float32)
    levels = np.asarray(levels, np.float32).reshape(-1)
    num = sigmas.shape[0] - 1
    if not 0 <= switch_step < num:
        raise InvalidArgumentError(
            f"switch_step must lie in [0, {num}) for {num} base steps, got {switch_step}"
        )
    if levels.size == 0:
        raise InvalidArgumentError(
            "the student has no trained levels (config.sample.sigmas): pass the workdir "
            "of a few-step distilled student"
        )
    if switch_step == 0:
        return np.zeros(0, np.float32), np.append(levels, 0.0).astype(np.float32)
    at = float(sigmas[switch_step])
    below = np.flatnonzero(levels <= at)
    if below.size == 0:
        usable = [k for k in range(1, num) if sigmas[k] >= levels[-1]]
        hint = (
            f"pass --switch_step=0 (the student alone) or 1..{usable[-1]}"
            if usable
            else "pass --switch_step=0 (the student alone)"
        )
        raise InvalidArgumentError(
            f"the student was trained only at noise levels "
            f"{', '.join(f'{s:.4g}' for s in levels)}; the base's sigmas[{switch_step}] = "
            f"{at:.4g} lies below all of them, so the student would run at a level it was "
            f"never trained on: {hint}, or distil a student with more steps "
            "(--config.distill.student_steps=4)"
        )
    first = int(below[0])
    base = np.append(sigmas[:switch_step], levels[first]).astype(np.float32)
    return base, np.append(levels[first:], 0.0).astype(np.float32)


def hybrid_sample(
    base: Denoiser,
    student: Denoiser,
    noise: jax.Array,
    sigmas: Any,
    switch_step: int,
    *,
    solver: Solver,
    student_levels: Any,
    guidance: Guidance | None = None,
    cond: Cond = None,
    uncond: Cond = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """The base model for ``switch_step`` steps, then the student's recipe to the end.

    Args:
        base: the base model's denoiser.
        student: the distilled student's denoiser.
        noise: ``[B, ...]`` unit noise (the base starts at ``noise * sigmas[0]``, the
            student alone at ``noise * student_levels[0]``).
        sigmas: the base schedule ``[N + 1]`` (host array; ``switch_step`` indexes it).
        switch_step: base steps before switching, ``0 <= switch_step < N``.
        solver: the base model's solver.
        student_levels: the student's trained input levels (``config.sample.sigmas`` of a
            student run, e.g. ``[80]`` for one step).
        guidance: guidance of the base phase (the student runs unguided).
        cond: conditioning.
        uncond: null conditioning for guidance.
        key: one PRNG key or ``[B]`` per-sample keys: the base's stochastic solver and
            the student's re-noising (needed when the student takes more than one step).

    Returns:
        ``(x0, {"nfe": base + student evaluations per sample})``.

    Raises:
        InvalidArgumentError: see :func:`handover`; also for a multi-step student tail
            without ``key``.
    """
    base_sigmas, tail = handover(sigmas, switch_step, student_levels)
    if key is None and tail.shape[0] > 2:
        raise InvalidArgumentError("the student re-noises between its steps: pass key=")
    keys = batch_keys(key, noise.shape[0])  # the same per-sample keys the base phase uses
    nfe = jnp.zeros((), jnp.int32)
    unit = jnp.asarray(noise, jnp.float32)
    if switch_step > 0:
        x, aux = sample(
            base,
            noise,
            base_sigmas,
            solver=solver,
            guidance=guidance,
            cond=cond,
            uncond=uncond,
            key=key,  # a stochastic base solver without a key is an error, as in sample()
        )
        nfe = nfe + aux["nfe"]
        unit = x / tail[0]  # the driver starts the student at unit * tail[0]
        keys = jax.vmap(lambda k: jax.random.fold_in(k, STUDENT_KEY_TAG))(keys)
    out, aux = sample(student, unit, tail, solver=renoise(), cond=cond, key=keys)
    return out, {"nfe": nfe + aux["nfe"]}


def make_hybrid_generate_fn(
    base: tuple[nn.Module, Formulation],
    student: tuple[nn.Module, Formulation],
    *,
    solver: Solver,
    sigmas: Any,
    switch_step: int,
    student_levels: Any,
    guidance: Guidance | None,
    sample_shape: tuple[int, ...],
    num_classes: int,
) -> Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, dict]]:
    """:func:`jaxdiff.generate.make_generate_fn` for the hybrid sampler.

    Args:
        base: the base model and its formulation.
        student: the student model and its formulation.
        solver: the base phase's solver.
        sigmas: the base schedule ``[N + 1]``.
        switch_step: base steps before the student takes over.
        student_levels: the student's trained input levels.
        guidance: guidance of the base phase.
        sample_shape: shape of one sample (both models must share it).
        num_classes: classes (0 = unconditional).

    Returns:
        ``generate((base_params, student_params), labels, keys) -> (images, aux)``; sample
        ``b`` starts from the noise of ``keys[b]``, as in the plain sampler.

    Raises:
        InvalidArgumentError: at once, for a hand-over :func:`handover` refuses.
    """
    sigmas = np.asarray(sigmas, np.float32)
    handover(sigmas, switch_step, student_levels)  # fail before anything is traced

    def generate(params, labels, keys):
        base_params, student_params = params
        cond, uncond = class_conditions(labels, num_classes)
        return hybrid_sample(
            model_denoiser(*base, base_params),
            model_denoiser(*student, student_params),
            start_noise(keys, sample_shape),
            sigmas,
            switch_step,
            solver=solver,
            student_levels=student_levels,
            guidance=guidance,
            cond=cond,
            uncond=uncond,
            key=keys,
        )

    return generate


__all__ = ["handover", "hybrid_sample", "make_hybrid_generate_fn"]
