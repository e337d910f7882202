"""TrigFlow (Lu & Song 2024) and its exact conversion to and from EDM's sigma space.

TrigFlow noises data ``x0`` (std ``sigma_d``) with ``z ~ N(0, sigma_d^2 I)`` as
``x_t = cos(t) x0 + sin(t) z`` for ``t`` in ``[0, pi/2]``. Dividing by ``cos(t)`` gives
EDM's ``x = x0 + sigma n`` with unit ``n = z / sigma_d``, so the two are the same process
under

    sigma = sigma_d tan(t),   t = arctan(sigma / sigma_d),   x = x_t / cos(t).

A diffusion model in TrigFlow predicts ``sigma_d F(x_t / sigma_d, t)`` = the PF-ODE velocity
``dx_t/dt``; from any EDM-space denoiser ``D`` (the model's ``x0`` estimate),

    dx_t/dt = (cos(t) x_t - D(x_t / cos(t), sigma_d tan(t))) / sin(t),

which for the exact denoiser is the exact PF-ODE of the data. With EDM's preconditioning
the two networks coincide up to sign: EDM's ``c_in x = x_t / sigma_d``, ``c_skip =
cos^2(t)`` and ``c_out = sigma_d sin(t)``, so ``D = cos(t) x_t + sigma_d sin(t) F_edm`` and
``F_trig(x_t / sigma_d, t) = -F_edm(x_t / sigma_d, log(sigma_d tan t) / 4)``. The
consistency function ``f = cos(t) x_t - sin(t) sigma_d F_trig`` is then exactly EDM's
denoiser ``D(x_t / cos t, sigma_d tan t)``: a student initialised with an EDM teacher's
weights starts as the teacher's denoiser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.diffusion.formulation import Denoiser, expand_to

NetApply = Callable[..., jax.Array]
"""``apply(params, x_in, noise_label, cond, **kwargs) -> F``: a raw network (e.g.
``lambda p, *a, **k: model.apply({"params": p}, *a, **k)``)."""

PARAMETERISATIONS = ("edm", "trigflow")
"""How a TrigFlow ``F`` is read from a raw network (see :func:`trig_net`)."""

LABEL_T_MIN = 1e-6
"""Smallest ``t`` an ``"edm"`` noise label is computed at (``log(0)`` is ``-inf``); the
consistency function multiplies ``F`` by ``sin(t)``, so ``f(x, 0) = x`` exactly anyway."""


def sigma_from_trig(t: ArrayLike, sigma_data: float) -> jax.Array:
    """EDM noise level ``sigma_d tan(t)`` of TrigFlow time ``t``."""
    return sigma_data * jnp.tan(jnp.asarray(t, jnp.float32))


def trig_from_sigma(sigma: ArrayLike, sigma_data: float) -> jax.Array:
    """TrigFlow time ``arctan(sigma / sigma_d)`` of EDM noise level ``sigma`` (inf -> pi/2)."""
    return jnp.arctan2(jnp.asarray(sigma, jnp.float32), sigma_data)


def trig_to_edm_x(x_t: jax.Array, t: ArrayLike) -> jax.Array:
    """EDM-space input ``x_t / cos(t)`` of a TrigFlow state (``t`` scalar or ``[B]``)."""
    return x_t / expand_to(jnp.cos(jnp.asarray(t, jnp.float32)), x_t)


def edm_to_trig_x(x: jax.Array, sigma: ArrayLike, sigma_data: float) -> jax.Array:
    """TrigFlow state ``cos(t) x = sigma_d x / sqrt(sigma^2 + sigma_d^2)`` of an EDM input."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return x * expand_to(sigma_data * jax.lax.rsqrt(sigma**2 + sigma_data**2), x)


def trig_noise(x0: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = cos(t) x0 + sin(t) z`` (``z`` already scaled by ``sigma_d``)."""
    return expand_to(jnp.cos(t), x0) * x0 + expand_to(jnp.sin(t), x0) * z


def teacher_velocity(
    denoise: Denoiser, x_t: jax.Array, t: jax.Array, cond: Any, sigma_data: float
) -> jax.Array:
    """PF-ODE velocity ``dx_t/dt`` of an EDM-space denoiser, in TrigFlow coordinates.

    Args:
        denoise: ``denoise(x, sigma, cond) -> x0`` (any jaxdiff formulation's denoiser).
        x_t: ``[B, ...]`` TrigFlow states.
        t: ``[B]`` times in ``(0, pi/2)`` (the formula divides by ``sin(t)``).
        cond: conditioning.
        sigma_data: the data std ``sigma_d``.

    Returns:
        ``(cos(t) x_t - D(x_t / cos t, sigma_d tan t)) / sin(t)``, shaped like ``x_t``.
    """
    x0 = denoise(trig_to_edm_x(x_t, t), sigma_from_trig(t, sigma_data), cond)
    return (expand_to(jnp.cos(t), x_t) * x_t - x0) / expand_to(jnp.sin(t), x_t)


def trig_net(
    apply: NetApply,
    params: Any,
    x_t: jax.Array,
    t: jax.Array,
    cond: Any,
    *,
    sigma_data: float,
    parameterisation: str = "edm",
    label_scale: float = 1.0,
    **kwargs: Any,
) -> jax.Array:
    """TrigFlow's ``F(x_t / sigma_d, t)`` read from a raw network.

    ``"edm"``: ``-net(x_t / sigma_d, log(sigma_d tan t) / 4)``, the exact TrigFlow form of
    an EDM-preconditioned network (module docstring), so EDM teachers' weights carry over.
    ``"trigflow"``: ``net(x_t / sigma_d, label_scale * t)``, the paper's own time label (for
    students trained from scratch).

    Raises:
        ValueError: for an unknown parameterisation.
    """
    x_in = x_t / sigma_data
    if parameterisation == "edm":
        sigma = sigma_from_trig(jnp.maximum(t, LABEL_T_MIN), sigma_data)
        return -apply(params, x_in, jnp.log(sigma) / 4.0, cond, **kwargs).astype(jnp.float32)
    if parameterisation == "trigflow":
        return apply(params, x_in, label_scale * t, cond, **kwargs).astype(jnp.float32)
    raise ValueError(f"parameterisation={parameterisation!r}: choose one of {PARAMETERISATIONS}")


def consistency_fn(x_t: jax.Array, t: jax.Array, f_net: jax.Array, sigma_data: float) -> jax.Array:
    """``f = cos(t) x_t - sin(t) sigma_d F``; ``f(x, 0) = x`` whatever ``F`` (finite) is."""
    return expand_to(jnp.cos(t), x_t) * x_t - expand_to(jnp.sin(t), x_t) * sigma_data * f_net


__all__ = [
    "LABEL_T_MIN",
    "PARAMETERISATIONS",
    "NetApply",
    "consistency_fn",
    "edm_to_trig_x",
    "sigma_from_trig",
    "teacher_velocity",
    "trig_from_sigma",
    "trig_net",
    "trig_noise",
    "trig_to_edm_x",
]
