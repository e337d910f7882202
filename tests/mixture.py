"""A class-conditional Gaussian mixture in 2-D with exact denoisers and classifiers.

Class ``k`` is ``N(MEANS[k], S^2 I)``; the unconditional density is the equal-weight
mixture. At noise level sigma, ``x = x0 + sigma n`` has class-conditional density
``N(MEANS[k], (S^2 + sigma^2) I)``, so

* conditional denoiser: ``D_c(x, sigma, k) = mu_k + S^2 / (S^2 + sigma^2) (x - mu_k)``;
* noisy classifier: ``log p(k | x, sigma) = log_softmax_k(log N(x; mu_k, (S^2 + sigma^2) I))``;
* unconditional denoiser: ``sum_k p(k | x, sigma) D_c(x, sigma, k)``.

Labels are ``0..K-1``; the null class is ``K`` (``NULL``), which ``denoiser`` maps to the
unconditional denoiser, per sample.
"""

import jax
import jax.numpy as jnp
import numpy as np

MEANS = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], np.float32)
S = 0.5
K = MEANS.shape[0]
NULL = K


def _sig(sigma, x):
    # x's precision: float32, or float64 in float64 runs (lower precisions compute in float32).
    sigma = jnp.asarray(sigma, jnp.promote_types(x.dtype, jnp.float32))
    return jnp.broadcast_to(sigma, x.shape[:1])[:, None]


def component_logits(x, sigma, s=S):
    """``[B, K]`` ``log N(x; mu_k, (s^2 + sigma^2) I)`` up to a constant shared by all k."""
    var = s**2 + _sig(sigma, x) ** 2
    d2 = jnp.sum((x[:, None, :] - MEANS[None]) ** 2, axis=-1)
    return -0.5 * d2 / var


def log_prob(x, sigma, y, s=S):
    """Exact noisy classifier ``log p(y | x, sigma)``, ``[B]``."""
    logp = jax.nn.log_softmax(component_logits(x, sigma, s), axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(y, jnp.int32)[:, None], axis=-1)[:, 0]


def clean_logits(x0):
    """A clean-data classifier: ``log p(k | x0)`` logits (the sigma = 0 classifier)."""
    return component_logits(x0, 0.0)


def denoiser(s=S, calls=None):
    """Exact ``denoise(x, sigma, cond)``: ``cond`` is ``[B]`` labels, ``NULL`` = unconditional.

    ``s`` other than ``S`` gives a deliberately wrong ("bad") model, e.g. for autoguidance.
    ``calls`` (a list) records each call's ``(batch, variant)``.
    """

    def d(x, sigma, cond, variant=None):
        if calls is not None:
            calls.append((x.shape[0], variant))
        sig2 = _sig(sigma, x) ** 2
        shrink = s**2 / (s**2 + sig2)  # [B, 1]
        comps = MEANS[None] + shrink[:, :, None] * (x[:, None, :] - MEANS[None])  # [B, K, 2]
        w = jax.nn.softmax(component_logits(x, sigma, s), axis=-1)
        d_u = jnp.sum(w[:, :, None] * comps, axis=1)
        cond = jnp.asarray(cond, jnp.int32)
        d_c = jnp.take_along_axis(comps, jnp.minimum(cond, K - 1)[:, None, None], axis=1)[:, 0]
        out = jnp.where((cond == NULL)[:, None], d_u, d_c)
        if variant is not None:  # a stand-in "perturbed network": a blurrier model
            out = out + 0.1 * (d_u - out)
        return out

    return d


def samples(key, labels):
    """Exact samples of the class-conditional distributions, ``[B, 2]``."""
    labels = jnp.asarray(labels, jnp.int32)
    return MEANS[labels] + S * jax.random.normal(key, (labels.shape[0], 2))


def sliced_wasserstein(a, b, num_projections=64, seed=0):
    """Sliced 2-Wasserstein distance between two equal-size 2-D point sets (numpy)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    theta = np.random.default_rng(seed).uniform(0, np.pi, num_projections)
    dirs = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    pa, pb = np.sort(a @ dirs.T, axis=0), np.sort(b @ dirs.T, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def ctx(sigma, b, i=0, num_steps=1, substep=0, sigma_next=0.0):
    """A :class:`StepCtx` for calling a guidance directly (inside or outside jit)."""
    from jaxdiff.guidance import StepCtx

    del b  # no method here draws randomness, so no per-sample keys (key=None)
    return StepCtx(
        jnp.int32(i), jnp.float32(sigma), jnp.float32(sigma_next), None, num_steps, substep
    )


def points(b, seed=0, scale=1.5):
    """``[b, 2]`` test inputs and cycling labels ``(x, cond, uncond)``."""
    x = scale * jax.random.normal(jax.random.key(seed), (b, 2)) + jnp.array([0.0, 0.5])
    return x, jnp.arange(b, dtype=jnp.int32) % K, jnp.full((b,), NULL, jnp.int32)
