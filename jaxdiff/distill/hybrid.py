"""Diversity distillation (Gandikota & Bau 2025): the base model first, the student after.

The distilled student has lost diversity mostly in the first, high-noise steps, where the
sample's layout is decided. The hybrid sampler runs the **base** (teacher) model with its
solver for the first ``switch_step`` steps of ``sigmas``, then hands ``x`` at
``sigmas[switch_step]`` to the **student**, which finishes with deterministic Euler steps
over its own levels below that noise level (for a one-step student: a single call,
``x0 = G(x, sigma_switch)``). ``switch_step = 0`` is the student alone from ``sigmas[0]``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.formulation import Cond, Denoiser
from jaxdiff.generate import model_denoiser, sample_keys_for
from jaxdiff.guidance.base import Guidance
from jaxdiff.samplers import Solver, get_solver
from jaxdiff.samplers.driver import sample


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


def hybrid_generate_samples(
    base_run: Any,
    student_run: Any,
    *,
    num: int,
    solver: Solver,
    sigmas: Any,
    switch_step: int,
    guidance: Guidance | None,
    labels: np.ndarray,
    seed: int,
    batch_size: int = 256,
) -> tuple[np.ndarray, int]:
    """:func:`jaxdiff.inference.generate_samples` for the hybrid sampler (two loaded runs).

    Sample ``j`` starts from the noise of ``fold_in(key(seed), j)``, as in the plain sampler.
    """
    if base_run.sample_shape != student_run.sample_shape:
        raise ValueError(
            f"base and student sample shapes differ: {base_run.sample_shape} vs "
            f"{student_run.sample_shape}"
        )
    levels = _student_levels(student_run)
    shape, num_classes = base_run.sample_shape, base_run.num_classes

    @jax.jit
    def generate(base_params, student_params, lab, keys):
        noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
        cond = uncond = None
        if num_classes > 0:
            cond = lab
            uncond = jnp.full_like(lab, num_classes)
        return hybrid_sample(
            model_denoiser(base_run.model, base_run.formulation, base_params),
            model_denoiser(student_run.model, student_run.formulation, student_params),
            noise,
            sigmas,
            switch_step,
            solver=solver,
            student_levels=levels,
            guidance=guidance,
            cond=cond,
            uncond=uncond,
            key=keys,
        )

    key = jax.random.key(seed)
    out, nfe = [], 0
    for start in range(0, num, batch_size):
        count = min(batch_size, num - start)
        lab = jnp.asarray(labels[start : start + count], jnp.int32)
        x, aux = generate(
            base_run.params, student_run.params, lab, sample_keys_for(key, start, count)
        )
        out.append(np.asarray(x))
        nfe = int(aux["nfe"])
    return np.concatenate(out), nfe


def _student_levels(student_run: Any) -> np.ndarray:
    from jaxdiff.distill.few_step import student_sigmas

    sc = student_run.config.sample
    steps = int(
        student_run.config.get("distill_config", {}).get("distill", {}).get("student_steps", 1)
    )
    return student_sigmas(steps, sc.sigma_min, sc.sigma_max, sc.rho)


__all__ = ["hybrid_generate_samples", "hybrid_sample", "student_tail"]
