"""Smooth Diffusion's step-wise variation regulariser as a train-step loss term.

Smooth Diffusion (Guo et al., CVPR 2024) keeps the ratio between a variation of a training
step's input noise and the resulting variation of its ``x0`` prediction the same at every
step, with a penalty shaped like StyleGAN2's path-length regulariser. Its training script
(``step_regularize`` in SHI-Labs/Smooth-Diffusion's ``train_smooth_diffusion.py``) does, on
the denoising loss's own DDPM draw ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``::

    y   = sqrt(1 - abar) u / sqrt(d),      u ~ N(0, I),  d = C H W
    r   = || d<x0_hat(x_t), y> / d eps ||_2                  (a VJP, double backward)
    m   = m_prev + 0.01 (mean_batch(r) - m_prev)             (running mean, m_prev detached)
    L   = L_denoise + lambda_reg * mean_batch((r - m)^2)     (lambda_reg = 1, every step)

In EDM space (``x = x_t / sqrt(abar) = x0 + sigma eps``, ``sigma^2 = (1 - abar) / abar``,
``x0_hat = D(x, sigma)``) the derivative through ``x = x0 + sigma eps`` is
``d x0_hat / d eps = sigma J`` with ``J = dD(x, sigma) / dx``, and
``sqrt(1 - abar) = sigma / sqrt(1 + sigma^2)``, so exactly::

    r = sigma^2 / sqrt(1 + sigma^2) * || J^T u ||_2 / sqrt(d)

which is what :func:`step_variation` computes (one ``jax.vjp`` of the denoiser; the outer
``value_and_grad`` of the train step differentiates through it).

The target ``m``: the reference keeps a running mean across steps (decay 0.01, reset to 0
at every restart). A pure step has no place for it, so ``target="batch"`` uses the
stop-gradient batch mean of ``r``; this is the reference with decay 1 exactly, gradient
included (the gradient of ``sum (r_i - mean r)^2`` through the mean is zero). With a
global batch of tens of examples the batch mean estimates ``E r`` at the current weights
closely, where the reference's 100-step average lags behind it. A positive number instead
fixes ``m`` (the ``a`` of the path-length form), pulling the variation to that level.

What differs from the reference by construction: the term makes its own forward pass
(``captures = False``) with its own noise level and noise draw from the formulation's
training distribution, where the reference reuses the denoising pass's ``x_t``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxdiff.diffusion.formulation import Cond, Denoiser, expand_to
from jaxdiff.training.step import LossInputs

BATCH_TARGET = "batch"


def step_variation(
    denoise: Denoiser, x: jax.Array, sigma: jax.Array, cond: Cond, direction: jax.Array
) -> jax.Array:
    """Smooth Diffusion's per-example output variation ``r`` (see the module docstring).

    Args:
        denoise: the EDM-space denoiser ``D(x, sigma, cond)``; each example's output must
            depend on that example's input only (true of the jaxdiff models).
        x: noisy inputs ``x0 + sigma eps``, shape ``[B, ...]``.
        sigma: ``[B]`` noise levels.
        cond: conditioning for ``denoise`` (labels or None).
        direction: ``[B, ...]`` standard normal directions ``u``.

    Returns:
        ``[B]`` float32 ``sigma^2 / sqrt(1 + sigma^2) * ||J^T u|| / sqrt(d)``, with
        ``J = dD/dx`` at ``(x, sigma)`` and ``d`` the size of one example.
    """
    _, vjp = jax.vjp(lambda v: denoise(v, sigma, cond), x.astype(jnp.float32))
    (pulled,) = vjp(direction.astype(jnp.float32))
    norm = jnp.sqrt(jnp.sum(pulled.reshape(pulled.shape[0], -1) ** 2, axis=1))
    d = math.prod(x.shape[1:])
    return sigma**2 / jnp.sqrt(1.0 + sigma**2) * norm / math.sqrt(d)


@dataclasses.dataclass(frozen=True)
class SmoothTerm:
    """The step-wise variation regulariser as a :class:`~jaxdiff.training.step.LossTerm`.

    Draws ``sigma`` from the formulation's training distribution, ``x = x0 + sigma eps``
    and a direction ``u`` from its own key, computes ``r`` with :func:`step_variation`,
    and returns ``weight * mean((r - m)^2)``.

    Attributes:
        weight: ``lambda_reg`` (the reference uses 1.0).
        target: ``"batch"`` (the stop-gradient batch mean of ``r``) or a fixed ``m >= 0``.
        name: metric prefix.
        captures: False: the term makes its own pass.
    """

    weight: float = 1.0
    target: float | str = BATCH_TARGET
    name: str = "smooth"
    captures: bool = False

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"SmoothTerm weight={self.weight} must be >= 0")
        if self.target != BATCH_TARGET and (isinstance(self.target, str) or not self.target >= 0):
            raise ValueError(
                f"SmoothTerm target={self.target!r}: use {BATCH_TARGET!r} or a number >= 0"
            )

    def __call__(self, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns ``(weight * mean((r - m)^2), {"variation": mean r, "penalty": ...})``."""
        x0 = inputs.batch["image"].astype(jnp.float32)
        k_sigma, k_noise, k_dir = jax.random.split(inputs.key, 3)
        sigma = inputs.formulation.sample_sigma(k_sigma, x0.shape[:1]).astype(jnp.float32)
        x = x0 + expand_to(sigma, x0) * jax.random.normal(k_noise, x0.shape, jnp.float32)
        direction = jax.random.normal(k_dir, x0.shape, jnp.float32)
        denoise = inputs.formulation.as_denoiser(inputs.net)
        r = step_variation(denoise, x, sigma, inputs.labels, direction)
        mean_r = jnp.mean(r)
        if self.target == BATCH_TARGET:
            m = jax.lax.stop_gradient(mean_r)
        else:
            m = jnp.float32(self.target)
        penalty = jnp.mean((r - m) ** 2)
        return self.weight * penalty, {"variation": mean_r, "penalty": penalty}
