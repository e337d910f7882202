"""The Guidance protocol: a pure, scan-safe transform of the denoiser.

Convention everywhere in jaxdiff: ``D_w = D_u + w (D_c - D_u)``, so ``w = 1`` is the
conditional model (no guidance) and ``w = 0`` the unconditional one. Ho & Salimans'
``w'`` is ``w - 1`` (see :func:`from_ho_salimans`).

A guidance object is called once per network-evaluation point of the solver (twice per
Heun step) and returns a :class:`GuideOut` plus its updated state. Its state is a
fixed-shape pytree created by ``init``, so it lives in the sampler's ``lax.scan`` carry.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.diffusion.formulation import Cond, Denoiser
from jaxdiff.errors import InvalidArgumentError

State = Any


class StepCtx(NamedTuple):
    """Where in the sampling loop a denoiser evaluation happens.

    Attributes:
        i: int32 step index (traced).
        sigma: scalar noise level of this evaluation (traced).
        sigma_next: scalar noise level the step moves to (traced).
        key: per-sample PRNG keys ``[B]`` for guidance that needs randomness.
        num_steps: total number of solver steps (static).
        substep: 0 for a step's first evaluation, 1 for a corrector's (static).
    """

    i: jax.Array
    sigma: jax.Array
    sigma_next: jax.Array
    key: jax.Array
    num_steps: int
    substep: int = 0


class GuideOut(NamedTuple):
    """What a guidance returns to the solver.

    Attributes:
        x0: the guided estimate of ``x0`` used for the update.
        nfe: network evaluations spent, counted per sample (a CFG call on a 2B batch
            counts 2); a Python int or an int32 array when the cost is data dependent.
        x0_renoise: the estimate whose implied noise the solver re-adds (CFG++ uses the
            unconditional one); ``None`` means ``x0``.
        aux: extra diagnostics (e.g. a cosine similarity); a dict of arrays.
    """

    x0: jax.Array
    nfe: int | jax.Array
    x0_renoise: jax.Array | None = None
    aux: dict | None = None


@runtime_checkable
class Guidance(Protocol):
    """A guidance method: pure function of the denoiser, scan-safe state."""

    def init(self, x_shape: tuple[int, ...], dtype: Any) -> State:
        """Returns the initial, fixed-shape state pytree; float leaves in ``dtype``.

        ``dtype`` is the sampler state's (float32, or float64 in a float64 run), so the
        state keeps its type through the sampler's ``lax.scan``.
        """
        ...

    def __call__(
        self,
        denoise: Denoiser,
        x: jax.Array,
        ctx: StepCtx,
        cond: Cond,
        uncond: Cond,
        state: State,
    ) -> tuple[GuideOut, State]:
        """Evaluates the guided denoiser at ``(x, ctx.sigma)``."""
        ...


def from_ho_salimans(w_prime: ArrayLike) -> jax.Array:
    """Converts Ho & Salimans' scale ``w'`` (``eps_c + w'(eps_c - eps_u)``) to jaxdiff's ``w``."""
    return jnp.asarray(w_prime) + 1.0


def to_ho_salimans(w: ArrayLike) -> jax.Array:
    """Converts jaxdiff's scale ``w`` to Ho & Salimans' ``w' = w - 1``."""
    return jnp.asarray(w) - 1.0


def float_dtype(x: jax.Array) -> jnp.dtype:
    """The float dtype of computations on ``x``: float64 for float64 ``x``, else float32."""
    return jnp.promote_types(x.dtype, jnp.float32)


def batch_sigma(sigma: ArrayLike, x: jax.Array) -> jax.Array:
    """Broadcasts a noise level to the per-sample ``[B]`` shape denoisers receive.

    The levels take ``x``'s precision (float32, or float64 in a float64 run).
    """
    return jnp.broadcast_to(jnp.asarray(sigma, float_dtype(x)), x.shape[:1])


def eval_branches(
    denoise: Denoiser, x: jax.Array, sigma: ArrayLike, conds: tuple[Cond, ...], **kwargs: Any
) -> tuple[jax.Array, ...]:
    """Evaluates one denoiser on several conditionings as a single ``kB`` batch.

    Branches that share weights go through the network together: one large call uses the
    accelerator better than ``k`` small ones and compiles the network once.

    Args:
        denoise: ``denoise(x, sigma, cond, **kwargs)``.
        x: ``[B, ...]`` noisy input.
        sigma: scalar or ``[B]`` noise levels.
        conds: ``k`` conditioning pytrees with matching structure and leading axis ``B``.
        **kwargs: passed to ``denoise``.

    Returns:
        ``k`` outputs of shape ``[B, ...]``, in the order of ``conds``.

    Raises:
        InvalidArgumentError: if a conditioning is None (there is nothing to batch over).
    """
    if any(c is None for c in conds):
        raise InvalidArgumentError(
            "eval_branches needs a conditioning pytree for every branch, got None: pass "
            "cond= and uncond= (e.g. the null class label) to sample()"
        )
    k, b = len(conds), x.shape[0]
    xs = jnp.concatenate([x] * k, axis=0)
    sig = jnp.tile(batch_sigma(sigma, x), k)
    cs = jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *conds)
    out = denoise(xs, sig, cs, **kwargs)
    return tuple(out[j * b : (j + 1) * b] for j in range(k))


def per_sample(scale: ArrayLike, x: jax.Array) -> jax.Array:
    """Broadcasts a scalar or per-sample ``[B]`` value against ``x`` (``[B, 1, ...]``).

    The result has ``x``'s float precision (see :func:`float_dtype`).
    """
    v = jnp.asarray(scale, float_dtype(x))
    if v.ndim == 0:
        v = jnp.broadcast_to(v, x.shape[:1])
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


@flax.struct.dataclass
class NoGuidance:
    """The plain denoiser: ``D(x, sigma, cond)``, one network evaluation."""

    def init(self, x_shape: tuple[int, ...], dtype: Any) -> State:
        """No state."""
        return ()

    def __call__(self, denoise, x, ctx, cond, uncond, state):
        """Calls the denoiser on ``cond`` only."""
        del uncond
        return GuideOut(x0=denoise(x, batch_sigma(ctx.sigma, x), cond), nfe=1), state
