"""From trained params to images: the model-aware layer over :func:`jaxdiff.samplers.sample`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.diffusion.formulation import Denoiser, Formulation
from jaxdiff.guidance.base import Guidance
from jaxdiff.samplers.base import Solver
from jaxdiff.samplers.driver import sample
from jaxdiff.utils.rng import start_noise


def model_denoiser(
    model: nn.Module, formulation: Formulation, params: Any, **model_kwargs: Any
) -> Denoiser:
    """Wraps a model and its params into ``denoise(x, sigma, cond) -> x0_hat``.

    Args:
        model: a jaxdiff linen model.
        formulation: the formulation it was trained with.
        params: its (unboxed) params, e.g. an EMA copy.
        **model_kwargs: static keyword arguments for ``model.apply`` (e.g. ``variant=``).
    """

    def net(x_in, noise_label, cond, **kwargs):
        return model.apply({"params": params}, x_in, noise_label, cond, **model_kwargs, **kwargs)

    return formulation.as_denoiser(net)


def class_conditions(labels: jax.Array | None, num_classes: int) -> tuple[Any, Any]:
    """``(cond, uncond)`` for class labels: the null class is label ``num_classes``.

    An unconditional model (``num_classes = 0``) gets ``(None, None)``.
    """
    if num_classes == 0:
        return None, None
    cond = jnp.asarray(labels, jnp.int32)
    return cond, jnp.full_like(cond, num_classes)


def make_generate_fn(
    model: nn.Module,
    formulation: Formulation,
    *,
    solver: Solver,
    sigmas: ArrayLike,
    guidance: Guidance | None,
    sample_shape: tuple[int, ...],
    num_classes: int,
    model_kwargs: dict | None = None,
) -> Callable[[Any, jax.Array | None, jax.Array], tuple[jax.Array, dict]]:
    """Returns ``generate(params, labels, keys) -> (images, aux)`` (jit it at the call site).

    Sample ``b`` draws its start noise from ``keys[b]`` and its per-step noise from keys
    derived from it, so results depend only on the keys, never on the batch.

    Args:
        model: the network.
        formulation: its formulation.
        solver: the solver.
        sigmas: ``[N + 1]`` noise levels.
        guidance: guidance or None (the null class is label ``num_classes``).
        sample_shape: shape of one sample, e.g. ``(8, 8, 1)``.
        num_classes: number of classes (0 = unconditional; ``labels`` is then ignored).
        model_kwargs: static keyword arguments of every network call (e.g. a
            guidance-distilled student's ``aux_time``).
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    model_kwargs = dict(model_kwargs or {})

    def generate(params, labels, keys):
        cond, uncond = class_conditions(labels, num_classes)
        den = model_denoiser(model, formulation, params, **model_kwargs)
        return sample(
            den,
            start_noise(keys, sample_shape),
            sigmas,
            solver=solver,
            guidance=guidance,
            cond=cond,
            uncond=uncond,
            key=keys,
        )

    return generate
