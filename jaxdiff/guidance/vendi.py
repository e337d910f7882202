"""Contextualized Vendi Score Guidance (c-VSG; Askari Hemmat et al., ECCV 2024).

The Vendi score of ``n`` unit feature vectors (rows of ``X``) is the exponential of the
von Neumann entropy of their cosine kernel: ``VS = exp(-sum_i l_i log l_i)`` with
``l_i`` the eigenvalues of ``K / n``, ``K = X X^T``. It is 1 for ``n`` identical points
and ``n`` for ``n`` orthogonal ones: an effective number of distinct samples. The
non-zero eigenvalues of ``X X^T / n`` are those of ``X^T X / n`` (``F x F``), so a set of
features is summarised exactly by its Gram matrix ``sum_k f_k f_k^T`` and its count: a
:class:`VendiBank` of any size has a fixed shape, one Gram matrix per context (class).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance.base import Guidance, GuideOut, NoGuidance, State, per_sample
from jaxdiff.guidance.cfg import cfg
from jaxdiff.guidance.checks import (
    check_choice,
    check_count,
    check_number,
    int_labels,
    require_callable,
)
from jaxdiff.guidance.switch import cond_guidance

FeaturesFn = Callable[[jax.Array], jax.Array]
"""``features_fn(x0) -> [B, F]``: a feature network of clean samples."""

FORMS = ("x0", "state")
GRADS = ("x0", "denoiser")


def vendi_entropy(a: jax.Array) -> jax.Array:
    """Von Neumann entropy ``-sum_i l_i log l_i`` of a symmetric PSD matrix (trace 1).

    Eigenvalues at or below ``1e-6`` (zero up to rounding) contribute nothing. Its
    derivative is the spectral one, ``-U diag(log l + 1) U^T`` restricted to the non-zero
    eigenvalues: no ``1 / (l_i - l_j)`` terms, so it is finite for the repeated zero
    eigenvalues of a rank-deficient kernel (where differentiating ``eigh`` gives NaN).
    The null-space terms dropped there are exactly zero for a kernel ``X^T X``.
    """
    # A plain function around the custom_jvp one, so the API reference shows this as a
    # documented function (pdoc renders a jax.custom_jvp object as a bare variable).
    return _vendi_entropy(a)


@jax.custom_jvp
def _vendi_entropy(a: jax.Array) -> jax.Array:
    lam = jnp.linalg.eigvalsh(a)
    pos = lam > 1e-6
    safe = jnp.where(pos, lam, 1.0)
    return -jnp.sum(jnp.where(pos, safe * jnp.log(safe), 0.0), axis=-1)


@_vendi_entropy.defjvp
def _vendi_entropy_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    lam, u = jnp.linalg.eigh(a)
    pos = lam > 1e-6
    safe = jnp.where(pos, lam, 1.0)
    h = -jnp.sum(jnp.where(pos, safe * jnp.log(safe), 0.0), axis=-1)
    weight = jnp.where(pos, -(jnp.log(safe) + 1.0), 0.0)
    grad = jnp.einsum("...ik,...k,...jk->...ij", u, weight, u)
    return h, jnp.sum(grad * da, axis=(-2, -1))


def unit(features: jax.Array) -> jax.Array:
    """Rows scaled to unit norm, in float32 (or float64) precision."""
    f = features.astype(jnp.promote_types(features.dtype, jnp.float32))
    return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def vendi_score(features: jax.Array) -> jax.Array:
    """Vendi score ``exp(H(K / n))`` of ``[n, F]`` features under the cosine kernel.

    Uses whichever of ``X X^T`` (``n x n``) and ``X^T X`` (``F x F``) is smaller: they
    share their non-zero eigenvalues. Differentiable (see :func:`vendi_entropy`).
    """
    x = unit(features)
    n = x.shape[0]
    k = x @ x.T if n <= x.shape[1] else x.T @ x
    return jnp.exp(vendi_entropy(k / n))


@flax.struct.dataclass
class VendiBank:
    """A set of unit features per context, as ``sum_k f_k f_k^T`` and a count.

    Attributes:
        gram: ``[C, F, F]`` Gram matrix of each context's unit features.
        count: ``[C]`` number of features in each context.
    """

    gram: jax.Array
    count: jax.Array


def bank_from_features(
    features: jax.Array, labels: jax.Array | None = None, num_contexts: int = 1
) -> VendiBank:
    """A :class:`VendiBank` of ``[M, F]`` features in contexts ``labels`` (``[M]`` ints).

    ``labels=None`` puts everything in context 0. Features are scaled to unit norm.
    """
    f = unit(jnp.asarray(features))
    if labels is None:
        labels = jnp.zeros(f.shape[:1], jnp.int32)
    onehot = jax.nn.one_hot(jnp.asarray(labels), num_contexts, dtype=f.dtype)
    return VendiBank(jnp.einsum("mc,mi,mj->cij", onehot, f, f), onehot.sum(0))


def bank_add(bank: VendiBank, features: jax.Array, labels: jax.Array | None = None) -> VendiBank:
    """``bank`` with ``[M, F]`` more features (contexts ``labels``; None = context 0)."""
    more = bank_from_features(features, labels, bank.gram.shape[0])
    return VendiBank(bank.gram + more.gram.astype(bank.gram.dtype), bank.count + more.count)


def _score(gram: jax.Array, count: jax.Array) -> jax.Array:
    return jnp.exp(vendi_entropy(gram / jnp.maximum(count, 1.0)[..., None, None]))


@flax.struct.dataclass
class VendiGuidance:
    """c-VSG: steer each sample's features away from a memory bank, within real exemplars.

    Per sample ``b`` with feature ``f_b`` (unit norm, of ``features_fn`` applied to the
    base guidance's x0 estimate) in context ``y_b`` (its class when the banks hold
    several contexts), the objective is::

        J_b = VS(bank[y_b] + {f_b}) - beta VS(exemplars[y_b] + {f_b})

    The first term grows when ``f_b`` differs from the earlier generations; the second,
    with ``beta > 0``, keeps it among real examples of its context (the reference's
    "contextualisation", ``beta = 2``). The guided estimate moves along the gradient
    ``g``, normalised per sample as in the reference::

        form "x0":    x0 = D + s ||D_b|| g / ||g||          (every solver)
        form "state": x0 = D + s ||x_b|| g / ||g||, x0_renoise = D

    The ``"state"`` form is the reference's ``latents += s ||latents|| g / ||g||``: with
    ``x0_renoise = D`` an Euler or ancestral step moves the state by exactly that
    amount. ``grad="denoiser"`` differentiates through the base guidance's network call
    (the reference backpropagates through the UNet); ``"x0"`` takes the gradient with
    respect to the estimate itself (no backward pass through the network). Samples whose
    bank context is empty are not guided (the reference skips its first image).

    State across batches lives outside the sampler: generate a batch, add its final
    features with :func:`bank_add`, and sample the next batch with
    ``guidance.replace(bank=new_bank)`` (a pytree leaf of fixed shape, so nothing
    recompiles). ``include_batch=True`` adds the other samples of the batch (their
    current estimates, same context, not differentiated) to each sample's bank, so a
    single batch is pushed apart without any earlier generations.

    Attributes:
        base: the guidance whose x0 estimate is steered (e.g. :class:`.cfg.CFG`).
        scale: ``s`` (scalar or ``[B]``); 0 = the base guidance.
        beta: weight of the exemplar term.
        bank: :class:`VendiBank` of earlier generations (None = only the batch).
        exemplars: :class:`VendiBank` of real exemplars (None = no exemplar term).
        features_fn: static; ``x0 -> [B, F]`` features.
        form: static; ``"x0"`` or ``"state"``.
        grad: static; ``"x0"`` or ``"denoiser"``.
        every: static; guide at steps ``i`` with ``i % every == 0`` (reference: 5 of 50).
        include_batch: static; also diversify against the rest of the batch.
    """

    base: Any = None
    scale: ArrayLike = 0.05
    beta: ArrayLike = 2.0
    bank: VendiBank | None = None
    exemplars: VendiBank | None = None
    features_fn: FeaturesFn | None = flax.struct.field(pytree_node=False, default=None)
    form: str = flax.struct.field(pytree_node=False, default="x0")
    grad: str = flax.struct.field(pytree_node=False, default="x0")
    every: int = flax.struct.field(pytree_node=False, default=1)
    include_batch: bool = flax.struct.field(pytree_node=False, default=False)

    def init(self, x_shape: tuple[int, ...], dtype: Any) -> State:
        """The base guidance's state."""
        return self.base.init(x_shape, dtype)

    def _contexts(self, cond, x) -> jax.Array:
        banks = [b for b in (self.bank, self.exemplars) if b is not None]
        if all(b.gram.shape[0] == 1 for b in banks):
            return jnp.zeros(x.shape[:1], jnp.int32)
        return int_labels("vendi", cond, x, " (the banks hold one context per class)")

    def _bank_count(self, y: jax.Array, dtype: Any) -> jax.Array:
        """``[B]`` size of each sample's bank of earlier generations (batch included)."""
        count = jnp.zeros(y.shape, dtype)
        if self.bank is not None:
            count = self.bank.count[y].astype(dtype)
        if self.include_batch:
            same = (y[:, None] == y[None, :]) & ~jnp.eye(y.shape[0], dtype=bool)
            count = count + same.sum(1).astype(dtype)
        return count

    def objective(self, x0: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(sum_b J_b, [B] bool guided)`` for estimates ``x0`` in contexts ``y``."""
        f = unit(self.features_fn(x0))
        own = jnp.einsum("bi,bj->bij", f, f)
        dim = f.shape[-1]
        count = self._bank_count(y, f.dtype)
        gram = jnp.zeros((x0.shape[0], dim, dim), f.dtype)
        if self.bank is not None:
            gram = self.bank.gram[y].astype(f.dtype)
        if self.include_batch:
            fs = jax.lax.stop_gradient(f)
            same = (y[:, None] == y[None, :]) & ~jnp.eye(y.shape[0], dtype=bool)
            gram = gram + jnp.einsum("bk,ki,kj->bij", same.astype(f.dtype), fs, fs)
        grams, counts, weights = [gram + own], [count + 1.0], [1.0]
        if self.exemplars is not None:
            grams.append(self.exemplars.gram[y].astype(f.dtype) + own)
            counts.append(self.exemplars.count[y].astype(f.dtype) + 1.0)
            weights.append(-self.beta)
        # Every score of the batch in ONE eigendecomposition: two LAPACK eigh calls that
        # XLA:CPU may run concurrently can deadlock (seen with jaxlib 0.10 at batch 20).
        scores = _score(jnp.concatenate(grams), jnp.concatenate(counts))
        parts = scores.reshape(len(grams), -1).sum(axis=1)
        total = sum(w * parts[k] for k, w in enumerate(weights))
        return total, count > 0

    def __call__(self, denoise, x: jax.Array, ctx, cond, uncond, state):
        """Returns the steered x0 estimate; see the class docstring."""
        y = self._contexts(cond, x)

        def off():
            return self.base(denoise, x, ctx, cond, uncond, state)

        def on():
            if self.grad == "denoiser":

                def guided(xx):
                    out, new = self.base(denoise, xx, ctx, cond, uncond, state)
                    return out.x0, (out, new)

                d, vjp, (out, new) = jax.vjp(guided, x, has_aux=True)
                (g,) = vjp(jax.grad(lambda z: self.objective(z, y)[0])(d))
                active = self._bank_count(y, d.dtype) > 0
            else:
                out, new = off()
                d = jax.lax.stop_gradient(out.x0)
                g, active = jax.grad(lambda z: self.objective(z, y), has_aux=True)(d)
            flat = g.reshape(g.shape[0], -1)
            g = g / per_sample(jnp.linalg.norm(flat, axis=1) + 1e-8, g)
            ref = x if self.form == "state" else d
            size = jnp.linalg.norm(ref.reshape(ref.shape[0], -1), axis=1)
            step = per_sample(jnp.where(active, size, 0.0), g) * per_sample(self.scale, g) * g
            x0 = out.x0 + step.astype(out.x0.dtype)
            renoise = out.x0 if self.form == "state" else out.x0_renoise
            return GuideOut(x0, out.nfe, renoise, out.aux), new

        if self.every <= 1:
            return on()
        return cond_guidance(ctx.i % self.every == 0, on, off)


def vendi(
    scale: ArrayLike = 0.05,
    *,
    features_fn: FeaturesFn,
    cfg_scale: ArrayLike | None = None,
    beta: ArrayLike = 2.0,
    bank: VendiBank | None = None,
    exemplars: VendiBank | None = None,
    form: str = "x0",
    grad: str = "x0",
    every: int = 1,
    include_batch: bool | None = None,
    base: Guidance | None = None,
) -> VendiGuidance:
    """c-VSG around CFG (``cfg_scale=w``) or the conditional denoiser; see :class:`VendiGuidance`.

    Defaults follow the reference (``facebookresearch/Contextualized-Vendi-Score-Guidance``
    ``config_geode.yaml``): scales 0.04-0.07 (0.05 here), ``beta = 2``. The reference
    guides every 5th of 50 steps (``every=5``); here every step by default.

    Reference: R. Askari Hemmat et al., "Improving Geo-diversity of Generated Images with
    Contextualized Vendi Score Guidance", ECCV 2024.

    Args:
        scale: ``s`` (scalar or ``[B]``).
        features_fn: feature network ``x0 -> [B, F]`` (required, keyword only).
        cfg_scale: CFG ``w`` of the base guidance, or None for the conditional denoiser.
        beta: exemplar weight ``>= 0``.
        bank: memory bank of earlier generations.
        exemplars: real exemplars.
        form: ``"x0"`` or ``"state"`` (Euler/ancestral solvers only).
        grad: ``"x0"`` or ``"denoiser"``.
        every: guide every ``every``-th step (``>= 1``).
        include_batch: diversify against the rest of the batch; None = only when no
            ``bank`` is given.
        base: a base guidance instead of ``cfg_scale``.

    Raises:
        InvalidArgumentError: for a non-finite scale, a negative beta, a bad form, grad or
            every, a ``features_fn`` that is not callable, or both ``cfg_scale`` and
            ``base``.
    """
    check_number("vendi", "scale", scale, example=0.05)
    check_number("vendi", "beta", beta, low=0.0, example=2.0)
    check_number("vendi", "cfg_scale", cfg_scale, none_ok=True)
    require_callable("vendi", "features_fn", features_fn, "a feature network x0 -> [B, F]")
    check_choice("vendi", "form", form, FORMS)
    check_choice("vendi", "grad", grad, GRADS)
    every = check_count("vendi", "every", every, example=5)
    if every < 1:
        raise InvalidArgumentError("vendi: every must be >= 1, got 0; pass e.g. every=5")
    if base is not None and cfg_scale is not None:
        raise InvalidArgumentError("vendi: give cfg_scale= or a base= guidance, not both")
    if base is None:
        base = NoGuidance() if cfg_scale is None else cfg(cfg_scale)
    return VendiGuidance(
        base=base,
        scale=scale,
        beta=beta,
        bank=bank,
        exemplars=exemplars,
        features_fn=features_fn,
        form=form,
        grad=grad,
        every=every,
        include_batch=bank is None if include_batch is None else bool(include_batch),
    )


__all__ = [
    "FORMS",
    "GRADS",
    "VendiBank",
    "VendiGuidance",
    "bank_add",
    "bank_from_features",
    "unit",
    "vendi",
    "vendi_entropy",
    "vendi_score",
]
