"""Deterministic ODE inversion and Direct Inversion editing (Ju et al., ICLR 2024).

Inversion runs a deterministic solver's own step on *increasing* noise levels: from the
image, taken as ``x`` at a low level ``sigma_lo > 0``, up to ``sigma_max``. Every
deterministic jaxdiff step is a formula in ``(sigma, sigma_next)`` that stays a consistent
integrator of the probability-flow ODE when ``sigma_next > sigma``: Euler (= DDIM with
``eta = 0``) becomes the classic DDIM inversion step, Heun keeps its trapezoidal
corrector (``sigma_next > 0`` always, so it never drops to Euler), and DPM-Solver++(2M)'s
exponential integrator and multistep extrapolation hold with ``h < 0``. Regeneration is
the ordinary :func:`~jaxdiff.samplers.sample` on the reversed grid (:func:`regenerate`).

Direct Inversion (:func:`direct_inversion_edit`) runs a source and a target branch as one
batch from the inverted latent. After each step the source branch gets the correction
``z*_{i+1} - x_src_{i+1}`` that puts it back on the stored inversion trajectory, so it
reproduces the input (up to float rounding) whatever the guidance scale; the reference
implementation (cure-lab/PnPInversion) adds it to the source branch only and lets
Prompt-to-Prompt attention injection carry the source into the target. Two knobs carry
the source into the target here: the edit depth ``strength`` (invert only part of the way
up the grid and edit from there, as SDEdit-style editors do) and ``inject``, Prompt-to-
Prompt's self-attention replacement: for the first editing steps the target branch's
conditional evaluations take the source branch's attention probabilities (the model's
``variant="inject"``, :class:`jaxdiff.models.UNet`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff.diffusion.formulation import Cond, Denoiser
from jaxdiff.diffusion.schedules import karras_sigmas
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance.base import Guidance, NoGuidance
from jaxdiff.samplers.base import EvalState, Solver, batch_keys
from jaxdiff.samplers.driver import sample, sampling_dtype, step_denoisers

EDIT_MODES = ("source", "both")
"""Where :func:`direct_inversion_edit` adds the per-step correction: ``"source"`` (the
paper's form) or ``"both"`` branches (the same correction added to the target too)."""


def edit_depth(num_steps: int, strength: float) -> int:
    """Levels ``k = round(strength * N)`` (halves up) of an ``N``-step grid an edit inverts.

    Raises:
        InvalidArgumentError: unless ``0 < strength <= 1`` and ``k >= 1``.
    """
    value = float(strength)
    k = int(np.floor(value * num_steps + 0.5)) if 0 < value <= 1 else 0  # halves round up
    if k < 1:
        raise InvalidArgumentError(
            f"edit strength {strength!r} on {num_steps} steps inverts {k} levels: pass a "
            f"strength in (0, 1] above {0.5 / num_steps:.3g} (1 = the whole grid)"
        )
    return k


def inversion_sigmas(
    num_steps: int, sigma_lo: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> np.ndarray:
    """Increasing Karras levels ``[N + 1]`` from ``sigma_lo`` to ``sigma_max`` (no 0).

    ``grid[::-1]`` is the matching sampling grid, which ends at ``sigma_lo``.
    """
    return karras_sigmas(num_steps + 1, sigma_lo, sigma_max, rho, append_zero=False)[::-1].copy()


def check_inversion_solver(solver: Solver) -> None:
    """Refuses a solver that draws noise: its step has no deterministic inverse.

    Raises:
        InvalidArgumentError: naming the solver and the deterministic alternatives.
    """
    if getattr(solver, "stochastic", False):
        raise InvalidArgumentError(
            f"{type(solver).__name__} is stochastic ({solver}): inversion needs a "
            "deterministic solver, e.g. euler, heun, dpmpp_2m or ddim:eta=0"
        )


def _check_grid(sigmas: jax.Array) -> int:
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise InvalidArgumentError(
            f"inversion sigmas must be a 1-D array of at least 2 levels, got shape "
            f"{sigmas.shape}: pass e.g. inversion_sigmas(18)"
        )
    try:
        values = np.asarray(sigmas, np.float64)
    except jax.errors.TracerArrayConversionError:
        return sigmas.shape[0] - 1  # traced: the caller vouches for the values
    if not (values[0] > 0 and np.all(np.diff(values) > 0) and np.all(np.isfinite(values))):
        raise InvalidArgumentError(
            f"inversion sigmas must increase from a level > 0, got {values[0]:g} ... "
            f"{values[-1]:g}: pass inversion_sigmas(N, sigma_lo, sigma_max) (the image is x "
            "at sigma_lo > 0, where the ODE's velocity (x - D) / sigma is defined)"
        )
    return sigmas.shape[0] - 1


def invert(
    denoise: Denoiser,
    x0: ArrayLike,
    sigmas: ArrayLike,
    *,
    solver: Solver,
    guidance: Guidance | None = None,
    cond: Cond = None,
    uncond: Cond = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Integrates the probability-flow ODE from ``x0`` up to ``sigmas[-1]``; jittable.

    The image is taken as ``x`` at ``sigmas[0] = sigma_lo > 0``, not at 0: the ODE's
    velocity ``(x - D(x, sigma)) / sigma`` is undefined at sigma 0, so no step can start
    there, while noise of std ``sigma_lo`` (0.002 by default, against a data std of 0.5)
    changes nothing visible. DDIM inversion does the same (its first level has
    ``alpha_bar < 1``). One ``lax.scan``; ``sigmas`` is an array input.

    Args:
        denoise: ``denoise(x, sigma[B], cond) -> x0_hat``.
        x0: images ``[B, ...]`` (float64 with x64 gives a float64 run, else float32).
        sigmas: increasing levels ``[N + 1]`` (:func:`inversion_sigmas`).
        solver: a deterministic solver (``euler``, ``heun``, ``dpmpp_2m``, ``ddim:eta=0``).
        guidance: None (default) is the plain denoiser on ``cond``, i.e. the conditional
            model with ``w = 1``; any :class:`~jaxdiff.guidance.Guidance` is allowed.
        cond: conditioning (e.g. the images' labels) or None.
        uncond: null conditioning for guidance that needs it.
        key: keys for guidance that draws noise (the solver draws none).

    Returns:
        ``(latent, aux)``: ``x`` at ``sigmas[-1]`` (not divided by it) and a dict with
        ``"trajectory"`` ``[N + 1, B, ...]`` (``x`` at every level, ``x0`` first and the
        latent last) and ``"nfe"`` (network evaluations per image).

    Raises:
        InvalidArgumentError: for a stochastic solver or a grid that does not increase
            from a level > 0.
    """
    check_inversion_solver(solver)
    dtype = sampling_dtype(x0)
    sigmas = jnp.asarray(sigmas, dtype)
    num_steps = _check_grid(sigmas)
    guidance = NoGuidance() if guidance is None else guidance
    x = jnp.asarray(x0, dtype)
    keys = batch_keys(key, x.shape[0])
    at_step = step_denoisers(denoise, guidance, solver, sigmas, cond, uncond, keys, num_steps)
    ev0 = EvalState(guidance.init(x.shape, x.dtype), jnp.zeros((), jnp.int32))

    def body(carry, i):
        x, state, ev = carry
        den, solver_keys = at_step(i)
        x, state, ev = solver.step(den, x, i, sigmas, state, ev, solver_keys)
        return (x, state, ev), x

    carry = (x, solver.init(x, sigmas), ev0)
    (latent, _, ev), path = jax.lax.scan(body, carry, jnp.arange(num_steps, dtype=jnp.int32))
    trajectory = jnp.concatenate([x[None], path], axis=0)
    return latent, {"trajectory": trajectory, "nfe": ev.nfe, "guidance_state": ev.guidance}


def regenerate(
    denoise: Denoiser,
    latent: ArrayLike,
    sigmas: ArrayLike,
    *,
    solver: Solver,
    guidance: Guidance | None = None,
    cond: Cond = None,
    uncond: Cond = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """The ordinary :func:`~jaxdiff.samplers.sample` from ``latent`` on the reversed grid.

    ``sigmas`` is the *inversion* grid (increasing); the run goes from ``sigmas[-1]`` down
    to ``sigmas[0] = sigma_lo``, where :func:`invert` took the image.
    """
    sigmas = jnp.asarray(sigmas, sampling_dtype(latent))
    noise = jnp.asarray(latent, sigmas.dtype) / sigmas[-1]
    return sample(
        denoise, noise, sigmas[::-1], solver=solver, guidance=guidance, cond=cond,
        uncond=uncond, key=key,
    )  # fmt: skip


def _injecting(denoise: Denoiser, b: int, null: Cond) -> Denoiser:
    """``denoise`` whose target rows take their source row's attention probabilities.

    Every call the editing guidance makes sees ``k`` branch copies of the ``[source;
    target]`` batch of ``2b`` rows (:func:`~jaxdiff.guidance.eval_branches` concatenates
    them). Target rows whose condition is not the null condition take row ``r - b``'s
    attention (its source twin in the same branch); source rows and the null-conditioned
    (unconditional) rows keep their own, as Prompt-to-Prompt edits the conditional half
    of its batch only.
    """

    def den(x, sigma, cond, **kwargs):
        m = x.shape[0]
        if m % (2 * b) or "variant" in kwargs:
            raise InvalidArgumentError(
                f"attention injection needs the editing guidance to call the denoiser on "
                f"copies of the [source; target] batch ({2 * b} rows) without its own "
                f"variant, got {m} rows and {kwargs.get('variant')!r}: use cfg or none"
            )
        rows = jnp.arange(m, dtype=jnp.int32)
        target = rows % (2 * b) >= b
        if null is not None and cond is not None:
            tiled = jax.tree.map(lambda n: jnp.concatenate([n] * (m // (2 * b))), null)
            same = jax.tree.map(lambda c, n: jnp.all((c == n).reshape(m, -1), axis=1), cond, tiled)
            target &= ~jnp.all(jnp.stack(jax.tree.leaves(same)), axis=0)
        donor = jnp.where(target, rows - b, rows)
        try:
            return denoise(x, sigma, cond, variant="inject", attn_donor=donor, **kwargs)
        except TypeError as err:
            if "keyword argument" not in str(err):
                raise
            raise InvalidArgumentError(
                f"attention injection (inject > 0) needs a denoiser that takes "
                f"variant='inject' and attn_donor= (a jaxdiff UNet via model_denoiser); "
                f"this one does not ({err}): pass inject=0"
            ) from None

    return den


def direct_inversion_edit(
    denoise: Denoiser,
    x0: ArrayLike,
    sigmas: ArrayLike,
    *,
    solver: Solver,
    cond_src: Cond,
    cond_tgt: Cond,
    uncond: Cond = None,
    guidance: Guidance | None = None,
    inversion_guidance: Guidance | None = None,
    mode: str = "source",
    strength: float = 1.0,
    inject: float = 0.0,
    key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Direct Inversion editing: invert, then a source and a target branch in one batch.

    The paper's form (cure-lab/PnPInversion, ``DirectInversion.invert`` and
    ``direct_inversion_p2p_guidance_forward``), with ``k = round(strength * N)``:

    1. invert ``x0`` with the conditional model on the source condition, ``w = 1``
       (``inversion_guidance=None``), up to level ``k`` of the grid, storing the
       trajectory ``z*_0 .. z*_k``;
    2. from ``z*_k``, step the batch ``[source; target]`` down ``sigmas[k], ...,
       sigmas[0]`` with the editing guidance (CFG with the null condition as the
       unconditional branch, the same scale for both branches), the source on
       ``cond_src`` and the target on ``cond_tgt``; during the first ``round(inject * k)``
       steps the target's conditional evaluations use the source's attention
       probabilities in every attention layer (:func:`_injecting`);
    3. after step ``i`` add ``z*_{k-i-1} - x_src`` to the source branch (``mode="source"``)
       or that same correction to both branches (``mode="both"``, not in the paper).

    The reference computes the corrections in a separate pass before editing; here each
    is computed inside the editing step, which gives the same numbers because the
    corrected source branch sits on the trajectory at every step. Without injection
    nothing flows from the source into the target, so with ``mode="source"`` and
    ``inject=0`` the target is exactly naive editing (invert on the source condition,
    sample the target condition with ``guidance``) from level ``k``.

    Args:
        denoise: ``denoise(x, sigma[B], cond) -> x0_hat``; with ``inject > 0`` it must take
            ``variant="inject"`` and ``attn_donor=`` (jaxdiff's UNet).
        x0: images ``[B, ...]``, taken at ``sigmas[0]`` (see :func:`invert`).
        sigmas: increasing levels ``[N + 1]`` (:func:`inversion_sigmas`).
        solver: a deterministic solver.
        cond_src: the images' conditioning (e.g. their labels).
        cond_tgt: the edit's conditioning (e.g. other labels).
        uncond: the null conditioning (e.g. the null class) for CFG.
        guidance: editing guidance on both branches, e.g. ``cfg(2.0)``; None = ``w = 1``.
        inversion_guidance: guidance while inverting; None = conditional, ``w = 1``.
        mode: ``"source"`` (the paper) or ``"both"``.
        strength: edit depth in (0, 1]: the fraction of the grid inverted (1 = all of it).
        inject: fraction in [0, 1] of the ``k`` editing steps with attention injection.
        key: keys for guidance that draws noise.

    Returns:
        ``(edited, aux)``: the target branch at ``sigma_lo`` and a dict with ``"source"``
        (the source branch: ``x0`` up to rounding), ``"latent"`` (``z*_k``), ``"steps"``
        (``k``), ``"inject_steps"`` and ``"nfe"`` (per image: inversion plus both branches).

    Raises:
        InvalidArgumentError: for an unknown mode, a strength or inject out of range, a
            stochastic solver, a bad grid, or injection into a denoiser without it.
    """
    if mode not in EDIT_MODES:
        raise InvalidArgumentError(
            f"direct inversion mode {mode!r}: choose 'source' (the paper: correct the "
            "source branch) or 'both' (the same correction on the target branch too)"
        )
    if not 0.0 <= float(inject) <= 1.0:
        raise InvalidArgumentError(
            f"inject={inject!r}: pass the fraction of editing steps with attention "
            "injection, in [0, 1] (0 = none; Prompt-to-Prompt replaces self-attention "
            "for the first 0.6)"
        )
    k = edit_depth(int(np.shape(sigmas)[0]) - 1, strength)
    sigmas = sigmas[: k + 1]  # the whole grid when strength = 1
    latent, inv = invert(
        denoise, x0, sigmas, solver=solver, guidance=inversion_guidance, cond=cond_src,
        uncond=uncond, key=key,
    )  # fmt: skip
    dtype = latent.dtype
    down = jnp.asarray(sigmas, dtype)[::-1]
    targets = inv["trajectory"][::-1][1:]  # z* at down[1], ..., down[k]
    b = latent.shape[0]
    n_inject = int(np.floor(float(inject) * k + 0.5))

    def both(a, c):
        return None if a is None else jax.tree.map(lambda u, v: jnp.concatenate([u, v]), a, c)

    cond = both(cond_src, cond_tgt)
    null = both(uncond, uncond)
    guidance = NoGuidance() if guidance is None else guidance
    x = jnp.concatenate([latent, latent])
    keys = jnp.concatenate([batch_keys(key, b)] * 2)
    ev0 = EvalState(guidance.init(x.shape, x.dtype), jnp.zeros((), jnp.int32))

    def body_for(den_fn):
        at_step = step_denoisers(den_fn, guidance, solver, down, cond, null, keys, k)

        def body(carry, inputs):
            x, state, ev = carry
            i, z_next = inputs
            den, solver_keys = at_step(i)
            x, state, ev = solver.step(den, x, i, down, state, ev, solver_keys)
            offset = z_next - x[:b]
            if mode == "both":
                x = x + jnp.concatenate([offset, offset])
            else:
                x = jnp.concatenate([x[:b] + offset, x[b:]])
            return (x, state, ev), None

        return body

    carry = (x, solver.init(x, down), ev0)
    steps = jnp.arange(k, dtype=jnp.int32)
    if n_inject > 0:  # the injected steps, then the plain ones: two static scans
        head = (steps[:n_inject], targets[:n_inject])
        carry, _ = jax.lax.scan(body_for(_injecting(denoise, b, null)), carry, head)
        steps, targets = steps[n_inject:], targets[n_inject:]
    if n_inject < k:
        carry, _ = jax.lax.scan(body_for(denoise), carry, (steps, targets))
    x, _, ev = carry
    # ev.nfe counts the 2B batch per sample of it; an image pays for both of its branches.
    nfe = inv["nfe"] + 2 * ev.nfe
    aux = {"source": x[:b], "latent": latent, "nfe": nfe, "steps": k}
    return x[b:], aux | {"inject_steps": n_inject}


__all__ = [
    "EDIT_MODES",
    "check_inversion_solver",
    "direct_inversion_edit",
    "edit_depth",
    "invert",
    "inversion_sigmas",
    "regenerate",
]
