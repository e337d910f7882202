"""Pure distillation losses: variational score distillation (weighted), GAN terms, R1.

All take and return float32 arrays; none closes over a network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.diffusion.formulation import expand_to


def _per_sample_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def dmd_normalizer(x: jax.Array, x0_p: jax.Array, eps: float = 1e-6) -> jax.Array:
    """DMD's per-sample ``1 / (mean_pix |x - x0_p| + eps)`` (no gradient)."""
    return jax.lax.stop_gradient(1.0 / (_per_sample_mean(jnp.abs(x - x0_p)) + eps))


def vsd_loss(
    x: jax.Array, x0_p: jax.Array, x0_q: jax.Array, weights: jax.Array | float = 1.0
) -> jax.Array:
    """f-distill's generator distribution-matching loss (DMD's stop-gradient MSE trick).

    ``g = sg(w (x0_q - x0_p))`` with ``w = weights / (mean|x - x0_p| + 1e-6)``; the loss
    ``0.5 mean((x - sg(x - g))^2)`` has gradient ``g / numel`` with respect to ``x``.

    Args:
        x: ``[B, ...]`` generator samples (differentiable).
        x0_p: teacher denoiser at ``(x_t, t)``.
        x0_q: fake-score denoiser at the same ``(x_t, t)``.
        weights: ``[B]`` normalised ``h`` (1 = reverse-KL) or a scalar.
    """
    x = x.astype(jnp.float32)
    x0_p = jax.lax.stop_gradient(x0_p.astype(jnp.float32))
    x0_q = jax.lax.stop_gradient(x0_q.astype(jnp.float32))
    w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), x.shape[:1]) * dmd_normalizer(x, x0_p)
    g = jax.lax.stop_gradient(expand_to(w, x) * (x0_q - x0_p))
    target = jax.lax.stop_gradient(x - g)
    return 0.5 * jnp.mean((x - target) ** 2)


def dmd2_loss(x: jax.Array, x0_real: jax.Array, x0_fake: jax.Array) -> jax.Array:
    """DMD2's distribution-matching loss as its paper and code write it (reference form).

    ``grad = (x0_fake - x0_real) / mean|x - x0_real|``; ``0.5 mse(x, sg(x - grad))``.
    Reverse-KL f-distill must equal this exactly (tested).
    """
    x = x.astype(jnp.float32)
    x0_real = jax.lax.stop_gradient(x0_real.astype(jnp.float32))
    x0_fake = jax.lax.stop_gradient(x0_fake.astype(jnp.float32))
    norm = _per_sample_mean(jnp.abs(x - x0_real)) + 1e-6
    grad = (x0_fake - x0_real) * expand_to(1.0 / norm, x)
    return 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - grad)) ** 2)


def gan_g_loss(fake_logits: jax.Array, kind: str = "nonsat") -> jax.Array:
    """Generator GAN loss: ``softplus(-D)`` (non-saturating) or ``-D`` (hinge)."""
    fake_logits = fake_logits.astype(jnp.float32)
    if kind == "nonsat":
        return jnp.mean(jax.nn.softplus(-fake_logits))
    if kind == "hinge":
        return -jnp.mean(fake_logits)
    raise ValueError(f"unknown GAN loss {kind!r}: use 'nonsat' or 'hinge'")


def gan_d_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str = "nonsat") -> jax.Array:
    """Discriminator loss: ``softplus(D_fake) + softplus(-D_real)`` or the hinge form.

    At the optimum of the non-saturating form ``D = log(p_real / p_fake)``.
    """
    real_logits = real_logits.astype(jnp.float32)
    fake_logits = fake_logits.astype(jnp.float32)
    if kind == "nonsat":
        return jnp.mean(jax.nn.softplus(fake_logits)) + jnp.mean(jax.nn.softplus(-real_logits))
    if kind == "hinge":
        return jnp.mean(jax.nn.relu(1.0 + fake_logits)) + jnp.mean(jax.nn.relu(1.0 - real_logits))
    raise ValueError(f"unknown GAN loss {kind!r}: use 'nonsat' or 'hinge'")


def r1_approx(real_logits: jax.Array, perturbed_logits: jax.Array) -> jax.Array:
    """Approximate R1: ``mean((D(x_real) - D(x_real + 0.1 eps))^2)``."""
    d = real_logits.astype(jnp.float32) - perturbed_logits.astype(jnp.float32)
    return jnp.mean(d**2)


__all__ = ["dmd2_loss", "dmd_normalizer", "gan_d_loss", "gan_g_loss", "r1_approx", "vsd_loss"]
