"""The sampling driver: one ``lax.scan`` over steps for every solver and guidance."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.diffusion.formulation import Cond, Denoiser
from jaxdiff.guidance.base import Guidance, NoGuidance, StepCtx
from jaxdiff.samplers.base import EvalState, Solver, sample_keys, step_keys


def _check_sigmas(sigmas: jax.Array) -> int:
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            f"sigmas must be a 1-D array of at least 2 noise levels (N steps need N + 1), "
            f"got shape {sigmas.shape}"
        )
    return sigmas.shape[0] - 1


def sample(
    denoise: Denoiser,
    noise: ArrayLike,
    sigmas: ArrayLike,
    *,
    solver: Solver,
    guidance: Guidance | None = None,
    cond: Cond = None,
    uncond: Cond = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Runs a solver from ``sigmas[0]`` to ``sigmas[-1]``; jittable end to end.

    The whole loop is one ``lax.scan``; ``sigmas`` is an array input, so new values (but
    not a new number of steps) reuse the compiled sampler. Works under ``jax.vmap``.

    Args:
        denoise: ``denoise(x, sigma, cond) -> x0_hat`` with ``sigma`` of shape ``[B]``
            (e.g. ``formulation.as_denoiser(net)``).
        noise: unit-variance Gaussian noise ``[B, ...]``; the start is ``noise * sigmas[0]``.
        sigmas: decreasing noise levels ``[N + 1]`` (usually ending in 0).
        solver: the solver, e.g. ``heun()``.
        guidance: a :class:`~jaxdiff.guidance.Guidance`; None means the plain denoiser.
        cond: conditioning pytree (leading axis ``B``) or None.
        uncond: the null conditioning for guidance that needs it (e.g. the null class).
        key: PRNG key, one for the batch (sample ``b`` uses ``fold_in(key, b)``) or ``[B]``
            per-sample keys; required by stochastic solvers.

    Returns:
        ``(x0, aux)``: the final samples (float32) and a dict with ``"nfe"`` (int32 network
        evaluations per sample, a 2B guidance call counting 2) and ``"guidance_state"``.

    Raises:
        ValueError: on a malformed ``sigmas`` or ``key``, or a stochastic solver without key.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num_steps = _check_sigmas(sigmas)
    if solver.stochastic and key is None:
        raise ValueError(f"{type(solver).__name__} is stochastic: pass key= to sample()")
    guidance = NoGuidance() if guidance is None else guidance
    x = jnp.asarray(noise, jnp.float32) * sigmas[0]
    keys = sample_keys(key, x.shape[0])
    ev0 = EvalState(guidance.init(x.shape, x.dtype), jnp.zeros((), jnp.int32))

    def body(carry, i):
        x, state, ev = carry
        solver_keys, guide_keys = step_keys(keys, i)

        def den(xx, sigma, ev, substep=0):
            ctx = StepCtx(i, sigma, sigmas[i + 1], guide_keys, num_steps, substep)
            out, gstate = guidance(denoise, xx, ctx, cond, uncond, ev.guidance)
            return out, EvalState(gstate, ev.nfe + out.nfe)

        x, state, ev = solver.step(den, x, i, sigmas, state, ev, solver_keys)
        return (x, state, ev), None

    carry = (x, solver.init(x, sigmas), ev0)
    (x, _, ev), _ = jax.lax.scan(body, carry, jnp.arange(num_steps, dtype=jnp.int32))
    return x, {"nfe": ev.nfe, "guidance_state": ev.guidance}
