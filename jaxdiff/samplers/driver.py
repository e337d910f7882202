"""The sampling driver: one ``lax.scan`` over steps for every solver and guidance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.diffusion.formulation import Cond, Denoiser
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance.base import Guidance, GuideOut, NoGuidance, StepCtx
from jaxdiff.samplers.base import EvalState, Solver, batch_keys, step_keys


def _check_sigmas(sigmas: jax.Array) -> int:
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise InvalidArgumentError(
            f"sigmas must be a 1-D array of at least 2 noise levels (N steps need N + 1), "
            f"got shape {sigmas.shape}: pass e.g. karras_sigmas(18)"
        )
    return sigmas.shape[0] - 1


def sampling_dtype(noise: ArrayLike) -> jnp.dtype:
    """The dtype a run computes in: float64 for float64 noise, float32 otherwise.

    float64 only exists with x64 enabled; lower precisions (bfloat16, float16) and
    non-float inputs are promoted to float32, the precision the solvers are tested in.
    """
    dtype = getattr(noise, "dtype", None)
    if dtype is not None and jnp.dtype(dtype) == jnp.float64 and jax.config.x64_enabled:
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _renoise_error(solver: Solver, guidance: Guidance) -> InvalidArgumentError:
    from jaxdiff.samplers import SOLVERS  # the registry imports this module

    able = [name for name, make in SOLVERS.items() if make().honours_renoise]
    return InvalidArgumentError(
        f"{type(solver).__name__} cannot honour the separate re-noising estimate "
        f"(GuideOut.x0_renoise) that {type(guidance).__name__} returns, so CFG++ would "
        f"silently become plain CFG: use one of the solvers {', '.join(able)}"
    )


def step_denoisers(
    denoise: Denoiser,
    guidance: Guidance,
    solver: Solver,
    sigmas: jax.Array,
    cond: Cond,
    uncond: Cond,
    keys: jax.Array,
    num_steps: int,
) -> Callable[[jax.Array], tuple[Any, jax.Array]]:
    """``at_step(i) -> (den, solver_keys)``: the guided denoiser a solver calls at step ``i``.

    Shared by :func:`sample` and the inversion scans: ``den(x, sigma, ev, substep=0)``
    evaluates ``guidance`` on ``denoise`` with the step's context, casts its outputs to
    the state's dtype, counts the evaluations in ``ev`` and refuses a separate re-noising
    estimate (CFG++) that ``solver`` would drop.
    """

    def typed_denoise(xx, sigma, c, **kwargs):
        # A denoiser of another precision must not change the scan carry's dtype.
        return jnp.asarray(denoise(xx, sigma, c, **kwargs)).astype(xx.dtype)

    def at_step(i):
        solver_keys, guide_keys = step_keys(keys, i)

        def den(xx, sigma, ev, substep=0):
            ctx = StepCtx(i, sigma, sigmas[i + 1], guide_keys, num_steps, substep)
            out, gstate = guidance(typed_denoise, xx, ctx, cond, uncond, ev.guidance)
            if out.x0_renoise is not None and not solver.honours_renoise:
                raise _renoise_error(solver, guidance)
            renoise = None if out.x0_renoise is None else out.x0_renoise.astype(xx.dtype)
            out = GuideOut(out.x0.astype(xx.dtype), out.nfe, renoise, out.aux)
            return out, EvalState(gstate, ev.nfe + out.nfe)

        return den, solver_keys

    return at_step


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

    The run computes in the noise's precision: float64 noise (with x64 enabled) gives a
    float64 run, anything else float32 (see :func:`sampling_dtype`). ``sigmas`` are cast to
    it and every denoiser output is cast to the state's dtype, so a float64 denoiser also
    works on float32 noise.

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
        ``(x0, aux)``: the final samples (float32, or float64 for float64 noise) and a dict
        with ``"nfe"`` (int32 network evaluations per sample, a 2B guidance call counting
        2) and ``"guidance_state"``.

    Raises:
        InvalidArgumentError: on a malformed ``sigmas`` or ``key``, a stochastic solver
            without key, or guidance returning ``x0_renoise`` (CFG++) to a solver that
            cannot honour it (raised while tracing).
    """
    dtype = sampling_dtype(noise)
    sigmas = jnp.asarray(sigmas, dtype)
    num_steps = _check_sigmas(sigmas)
    if solver.stochastic and key is None:
        raise InvalidArgumentError(
            f"{type(solver).__name__} is stochastic: pass key= to sample() "
            "(e.g. key=jax.random.key(0))"
        )
    guidance = NoGuidance() if guidance is None else guidance
    x = jnp.asarray(noise, dtype) * sigmas[0]
    keys = batch_keys(key, x.shape[0])
    ev0 = EvalState(guidance.init(x.shape, x.dtype), jnp.zeros((), jnp.int32))

    at_step = step_denoisers(denoise, guidance, solver, sigmas, cond, uncond, keys, num_steps)

    def body(carry, i):
        x, state, ev = carry
        den, solver_keys = at_step(i)
        x, state, ev = solver.step(den, x, i, sigmas, state, ev, solver_keys)
        return (x, state, ev), None

    carry = (x, solver.init(x, sigmas), ev0)
    (x, _, ev), _ = jax.lax.scan(body, carry, jnp.arange(num_steps, dtype=jnp.int32))
    return x, {"nfe": ev.nfe, "guidance_state": ev.guidance}
