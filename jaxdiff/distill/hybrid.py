"""Diversity distillation (Gandikota & Bau 2025): the base model first, the student after.

The distilled student has lost diversity mostly in the first, high-noise steps, where the
sample's layout is decided. The hybrid sampler runs the **base** (teacher) model with its
solver for the first ``switch_step`` steps of ``sigmas``, then hands ``x`` at
``sigmas[switch_step]`` to the **student**, which finishes with deterministic Euler steps
over its own levels below that noise level (for a one-step student: a single call,
``x0 = G(x, sigma_switch)``). ``switch_step = 0`` is the student alone from ``sigmas[0]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.formulation import Cond, Denoiser, Formulation
from jaxdiff.generate import class_conditions, model_denoiser
from jaxdiff.guidance.base import Guidance
from jaxdiff.samplers import Solver, get_solver
from jaxdiff.samplers.driver import sample
from jaxdiff.utils.rng import start_noise


def student_tail(sigma_switch: float, levels: Any) -> np.ndarray:
    """The student's Euler schedule from ``sigma_switch``: its levels below it, then 0."""
    rest = [float(s) for s in np.asarray(levels) if float(s) < sigma_switch]
    return np.asarray([sigma_switch, *rest, 0.0], np.float32)


def hybrid_sample(
    base: Denoiser,
    student: Denoiser,
    noise: jax.Array,
    sigmas: Any,
    switch_step: int,
    *,
    solver: Solver,
    student_levels: Any = (),
    guidance: Guidance | None = None,
    cond: Cond = None,
    uncond: Cond = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Base model for ``sigmas[:switch_step + 1]``, then the student to the end.

    Args:
        base: the base model's denoiser.
        student: the distilled student's denoiser.
        noise: ``[B, ...]`` unit noise (the start is ``noise * sigmas[0]``).
        sigmas: the base schedule ``[N + 1]`` (host array; ``switch_step`` indexes it).
        switch_step: base steps before switching, ``0 <= switch_step < N``.
        solver: the base model's solver.
        student_levels: the student's own input levels (e.g. ``[80]`` for one step).
        guidance: guidance of the base phase (the student runs unguided).
        cond: conditioning.
        uncond: null conditioning for guidance.
        key: PRNG key for stochastic solvers.

    Returns:
        ``(x0, {"nfe": base + student evaluations per sample})``.

    Raises:
        ValueError: for ``switch_step`` outside ``[0, N)``.
    """
    sigmas = np.asarray(sigmas, np.float32)
    num = sigmas.shape[0] - 1
    if not 0 <= switch_step < num:
        raise ValueError(
            f"switch_step must lie in [0, {num}) for {num} base steps, got {switch_step}"
        )
    x = jnp.asarray(noise, jnp.float32)
    nfe = jnp.zeros((), jnp.int32)
    if switch_step > 0:
        x, aux = sample(
            base,
            noise,
            sigmas[: switch_step + 1],
            solver=solver,
            guidance=guidance,
            cond=cond,
            uncond=uncond,
            key=key,
        )
        nfe = nfe + aux["nfe"]
        unit = x / sigmas[switch_step]
    else:
        unit = x
    tail = student_tail(float(sigmas[switch_step]), student_levels)
    out, aux = sample(student, unit, tail, solver=get_solver("euler"), cond=cond)
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
        student_levels: the student's own input levels.
        guidance: guidance of the base phase.
        sample_shape: shape of one sample (both models must share it).
        num_classes: classes (0 = unconditional).

    Returns:
        ``generate((base_params, student_params), labels, keys) -> (images, aux)``; sample
        ``b`` starts from the noise of ``keys[b]``, as in the plain sampler.
    """
    sigmas = np.asarray(sigmas, np.float32)

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


__all__ = ["hybrid_sample", "make_hybrid_generate_fn", "student_tail"]
