"""The Formulation interface: a network wrapped into an EDM-space denoiser, plus its loss.

Every formulation (EDM, VP epsilon, v-prediction, flow matching) is written as EDM
preconditioning (Karras et al. 2022, Table 1)::

    D(x, sigma, cond) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), cond)

where ``x = x0 + sigma n`` and ``F`` is the raw network. The training target for ``F`` is
``(x0 - c_skip x) / c_out``; with the formulation's natural weighting
``lambda(sigma) = 1 / c_out(sigma)^2`` in x0 space, the loss on ``F`` is plain MSE. That one
identity covers EDM's preconditioned loss, epsilon MSE, v MSE and flow-matching velocity MSE.
Samplers only ever see the :data:`Denoiser`; they never know which formulation trained it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

Cond = Any
"""Conditioning: any pytree whose leaves have a leading batch axis, or ``None``."""

Denoiser = Callable[..., jax.Array]
"""``denoise(x, sigma, cond) -> x0_hat``; ``sigma`` has shape ``[B]``."""

NetFn = Callable[..., jax.Array]
"""``net(x_in, noise_label, cond, **kwargs) -> F``: a bound network apply function."""


class Precond(NamedTuple):
    """EDM preconditioning coefficients, each broadcastable against ``x``."""

    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array  # shape [B]: the network's noise label


def expand_to(v: ArrayLike, x: jax.Array) -> jax.Array:
    """Broadcasts a scalar or per-sample ``[B]`` array to ``x``'s rank (``[B, 1, ...]``)."""
    v = jnp.asarray(v, dtype=jnp.float32)
    if v.ndim == 0:
        v = jnp.broadcast_to(v, x.shape[:1])
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class Formulation(abc.ABC):
    """Wraps a network into a denoiser and defines its training loss.

    Subclasses give the preconditioning, the noise-level distribution used in training,
    and the inverse of the noise label. They are frozen dataclasses: hashable, so they can
    be closed over or passed as static arguments to ``jax.jit``.
    """

    @abc.abstractmethod
    def precondition(self, sigma: jax.Array) -> Precond:
        """Returns ``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma`` of shape [B]."""

    @abc.abstractmethod
    def sample_sigma(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Draws training noise levels from the formulation's distribution."""

    @abc.abstractmethod
    def sigma_from_noise_label(self, c_noise: ArrayLike) -> jax.Array:
        """Inverts ``c_noise``: the sigma a network saw given its noise label."""

    def target(self, x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
        """Returns the regression target of ``F``: ``(x0 - c_skip x) / c_out``.

        Subclasses override it with an algebraically equal closed form (eps, v, velocity)
        that avoids the division.
        """
        x = x0 + expand_to(sigma, x0) * noise
        c = self.precondition(sigma)
        return (x0 - expand_to(c.c_skip, x0) * x) / expand_to(c.c_out, x0)

    def loss_weight(self, sigma: ArrayLike) -> jax.Array:
        """Returns the x0-space weight ``lambda(sigma) = 1 / c_out^2`` of the loss."""
        c_out = self.precondition(jnp.atleast_1d(jnp.asarray(sigma, jnp.float32))).c_out
        return (1.0 / c_out**2).reshape(jnp.shape(sigma))

    def denoise(
        self, net: NetFn, x: jax.Array, sigma: ArrayLike, cond: Cond = None, **kwargs: Any
    ) -> jax.Array:
        """Evaluates the preconditioned denoiser ``D(x, sigma, cond)``.

        Args:
            net: bound network, ``net(x_in, noise_label, cond, **kwargs) -> F``.
            x: noisy input ``x0 + sigma n`` in EDM space, shape ``[B, ...]``.
            sigma: scalar or ``[B]`` noise levels.
            cond: conditioning pytree or None.
            **kwargs: passed to ``net`` (e.g. ``train=True``, ``variant=...``).

        Returns:
            The float32 estimate of ``x0``, shaped like ``x``.
        """
        x = x.astype(jnp.float32)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        c = self.precondition(sigma)
        f = net(expand_to(c.c_in, x) * x, c.c_noise, cond, **kwargs).astype(jnp.float32)
        return expand_to(c.c_skip, x) * x + expand_to(c.c_out, x) * f

    def as_denoiser(self, net: NetFn) -> Denoiser:
        """Returns ``denoise(x, sigma, cond, **kwargs)`` with ``net`` closed over."""

        def denoise(x: jax.Array, sigma: ArrayLike, cond: Cond = None, **kwargs: Any):
            return self.denoise(net, x, sigma, cond, **kwargs)

        return denoise

    def loss_at(
        self,
        net: NetFn,
        x0: jax.Array,
        sigma: jax.Array,
        noise: jax.Array,
        cond: Cond = None,
        **kwargs: Any,
    ) -> jax.Array:
        """Per-example loss at given noise levels and noise (deterministic).

        Returns:
            ``[B]`` mean over non-batch axes of ``(F - target)^2``, which equals
            ``lambda(sigma) * mean((D - x0)^2)``.
        """
        x0 = x0.astype(jnp.float32)
        x = x0 + expand_to(sigma, x0) * noise
        c = self.precondition(sigma)
        f = net(expand_to(c.c_in, x) * x, c.c_noise, cond, **kwargs).astype(jnp.float32)
        err = (f - self.target(x0, noise, sigma)) ** 2
        return jnp.mean(err.reshape(err.shape[0], -1), axis=1)

    def loss(
        self, net: NetFn, x0: jax.Array, key: jax.Array, cond: Cond = None, **kwargs: Any
    ) -> jax.Array:
        """Per-example training loss with noise levels and noise drawn from ``key``.

        Args:
            net: bound network (see :meth:`denoise`).
            x0: clean data ``[B, ...]``.
            key: PRNG key.
            cond: conditioning pytree or None.
            **kwargs: passed to ``net``.

        Returns:
            ``[B]`` per-example losses.
        """
        k_sigma, k_noise = jax.random.split(key)
        sigma = self.sample_sigma(k_sigma, x0.shape[:1])
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        return self.loss_at(net, x0, sigma, noise, cond, **kwargs)
