"""Few-step students: DMD2's backward simulation and bottom-up refinement (1 -> 4 steps).

A K-step student is one set of weights evaluated at K fixed noise levels
``sigma_0 = sigma_max > sigma_1 > ... > sigma_{K-1}`` (:func:`student_sigmas`). Sampling
(:func:`few_step_sample`, and the ``renoise`` solver through the normal sampler path) is
DMD2's loop: ``x0 = G(x, sigma_k)``, then re-noise with fresh noise
``x = x0 + sigma_{k+1} eps``; the last ``x0`` is the sample. Sampling with ``k < K``
steps uses ``k`` of the trained levels (:func:`level_indices`), never others.

**Backward simulation** (:func:`backward_simulate`, training): draw one step index
``k`` for the batch, roll the *current* generator from noise for ``k`` steps without
gradients, and return ``G(x_k, sigma_k)`` with gradients, so the losses train the student
on the inputs it actually meets at inference.

**Bottom-up refinement** (NitroFusion), scheme implemented here: training is split into
stages; in stage ``s`` (``s = 1..K``) the step index ``k`` is drawn uniformly from
``0..s-1``, i.e. the student first learns the one-step map at ``sigma_max`` alone, then
the same weights are refined with 2, 3 and finally K steps in the backward simulation,
while the earlier steps keep being trained (:func:`active_steps` gives ``s`` from the
training step; it is a traced argument, so no stage recompiles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.diffusion.formulation import expand_to
from jaxdiff.samplers.base import batch_keys, normal_like, step_keys

GenFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]
"""``gen(params, x, sigma, cond) -> x0``: the student denoiser."""


def student_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> np.ndarray:
    """The K input noise levels of a K-step student: the first K of ``karras(K + 1)``.

    ``K = 1`` gives ``[sigma_max]``; ``K = 4`` (EDM defaults) about ``[80, 15, 2.5, 0.3]``,
    so the last step does not sit uselessly at ``sigma_min``.
    """
    if num_steps < 1:
        raise ValueError(f"a student needs num_steps >= 1, got {num_steps}")
    if num_steps == 1:
        return np.asarray([sigma_max], np.float32)
    return karras_sigmas(num_steps + 1, sigma_min, sigma_max, rho, append_zero=False)[:num_steps]


def active_steps(step: int | jax.Array, stage_length: int, num_steps: int) -> jax.Array:
    """Bottom-up refinement: steps trained at ``step`` (1 for the first ``stage_length``...).

    ``stage_length = 0`` trains all ``num_steps`` from the start.
    """
    if stage_length <= 0:
        return jnp.asarray(num_steps, jnp.int32)
    return jnp.minimum(1 + jnp.asarray(step, jnp.int32) // stage_length, num_steps)


def backward_simulate(
    gen: GenFn,
    params: Any,
    noise: jax.Array,
    cond: Any,
    sigmas: Sequence[float] | jax.Array,
    key: jax.Array,
    num_active: int | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """DMD2 backward simulation; returns ``(G(x_k, sigma_k) with gradients, k)``.

    Args:
        gen: the student denoiser.
        params: its params (differentiated only through the last call).
        noise: ``[B, ...]`` unit Gaussian noise.
        cond: conditioning.
        sigmas: ``[K]`` student noise levels (static length).
        key: PRNG key: the shared step index and the re-noising noise.
        num_active: draw ``k`` from ``0..num_active-1`` (default K; see
            :func:`active_steps`).
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num = sigmas.shape[0]
    if num == 1:
        return gen(params, sigmas[0] * noise, sigmas[0], cond), jnp.zeros((), jnp.int32)
    k_idx, k_noise = jax.random.split(key)
    active = num if num_active is None else num_active
    k = jax.random.randint(k_idx, (), 0, active)
    frozen = jax.lax.stop_gradient(params)

    def body(i, x):
        x0 = gen(frozen, x, sigmas[i], cond)
        eps = jax.random.normal(jax.random.fold_in(k_noise, i), x.shape, jnp.float32)
        return jax.lax.stop_gradient(x0 + sigmas[i + 1] * eps)

    x_k = jax.lax.fori_loop(0, k, body, sigmas[0] * noise)
    return gen(params, x_k, sigmas[k], cond), k


def few_step_sample(
    gen: GenFn,
    params: Any,
    noise: jax.Array,
    cond: Any,
    sigmas: Sequence[float] | jax.Array,
    key: jax.Array | None = None,
) -> jax.Array:
    """Samples a K-step student: ``x0 = G(x, sigma_k)``, re-noised between steps.

    The reference form of the ``renoise`` solver (:class:`jaxdiff.samplers.Renoise`):
    ``sample(den, noise, [*sigmas, 0], solver=renoise(), key=key)`` gives the same
    samples for the same keys.

    Args:
        gen: the student denoiser.
        params: its params.
        noise: ``[B, ...]`` unit noise; the start is ``sigmas[0] * noise``.
        cond: conditioning.
        sigmas: ``[K]`` decreasing input levels (the student's, :func:`student_sigmas`).
        key: seeds the re-noising (needed when K > 1): one key (sample ``b`` uses
            ``fold_in(key, b)``) or ``[B]`` per-sample keys; step ``i``'s noise of sample
            ``b`` comes from its step key, as in the sampling driver, so a sample does not
            depend on its batch.

    Raises:
        ValueError: for K > 1 without ``key``.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num = sigmas.shape[0]
    if num > 1 and key is None:
        raise ValueError("a multi-step student re-noises between steps: pass key=")
    keys = batch_keys(key, noise.shape[0]) if num > 1 else None
    x = sigmas[0] * noise
    x0 = x
    for i in range(num):
        x0 = gen(params, x, sigmas[i], cond)
        if i + 1 < num:
            eps = normal_like(step_keys(keys, jnp.int32(i))[0], x0)
            x = x0 + expand_to(sigmas[i + 1], x0) * eps
    return x0


def level_indices(num_levels: int, steps: int) -> np.ndarray:
    """Which of a student's K trained levels a k-step run uses (``1 <= k <= K``).

    The rule: evenly spaced indices ``round(i (K - 1) / (k - 1))``, ``i = 0..k-1``, halves
    rounded up, so the first level (``sigma_max``) is always used and, for ``k > 1``, the
    last one too (K = 4: k = 1 -> [0], 2 -> [0, 3], 3 -> [0, 2, 3], 4 -> [0, 1, 2, 3]).

    Raises:
        ValueError: for ``k`` outside ``1..K``.
    """
    if not 1 <= steps <= num_levels:
        raise ValueError(
            f"a student trained at {num_levels} levels samples with 1..{num_levels} steps, "
            f"got {steps}"
        )
    if steps == 1:
        return np.zeros(1, np.int64)
    # Integer round-half-up of i (K - 1) / (k - 1): no float ties to break.
    i = np.arange(steps)
    return (2 * i * (num_levels - 1) + (steps - 1)) // (2 * (steps - 1))


__all__ = [
    "active_steps",
    "backward_simulate",
    "few_step_sample",
    "level_indices",
    "student_sigmas",
]
