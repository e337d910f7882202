"""Pure denoise-and-features functions of the networks a distillation run uses.

A :data:`DenoiseFeats` is ``fn(params, x, sigma, cond) -> (x0_hat, [features])``: the
EDM-space denoiser plus the intermediate activations a discriminator head reads. For the
:class:`~jaxdiff.models.UNet` the features come from its ``"intermediates"`` collection
(``enc{level}`` and ``mid``); one forward pass gives both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.diffusion.formulation import Formulation, expand_to
from jaxdiff.errors import InvalidArgumentError

DenoiseFeats = Callable[..., tuple[jax.Array, list[jax.Array]]]


def unet_features(
    model: nn.Module,
    params: Any,
    x_in: jax.Array,
    noise_label: jax.Array,
    cond: Any,
    names: Sequence[str],
) -> tuple[jax.Array, list[jax.Array]]:
    """Runs a UNet once; returns its output and the sown features ``names`` (in order).

    Raises:
        InvalidArgumentError: for a name the model does not sow (the message lists the
            sown ones).
    """
    out, state = model.apply({"params": params}, x_in, noise_label, cond, mutable=["intermediates"])
    sown = state.get("intermediates", {})
    missing = [n for n in names if n not in sown]
    if missing:
        raise InvalidArgumentError(
            f"features {missing} are not sown by this model; it sows {sorted(sown)}: "
            "choose the feature names among those"
        )
    return out, [sown[n][0] for n in names]


def make_denoise_feats(
    model: nn.Module,
    formulation: Formulation,
    names: Sequence[str] = ("enc0", "mid"),
    *,
    guidance_scale: float = 1.0,
    num_classes: int = 0,
) -> DenoiseFeats:
    """``fn(params, x, sigma, cond) -> (x0_hat, feats)`` for a UNet.

    Args:
        model: the UNet.
        formulation: its formulation (preconditioning).
        names: sown features to return (empty: none).
        guidance_scale: classifier-free guidance ``w`` of the returned ``x0_hat`` (1 =
            none); features are those of the conditional branch.
        num_classes: classes of the model (the null class id for guidance).
    """
    names = tuple(names)

    def net_call(params, x, sigma, cond):
        c = formulation.precondition(sigma)
        x_in = expand_to(c.c_in, x) * x
        if names:
            f, feats = unet_features(model, params, x_in, c.c_noise, cond, names)
        else:
            f, feats = model.apply({"params": params}, x_in, c.c_noise, cond), []
        x0 = expand_to(c.c_skip, x) * x + expand_to(c.c_out, x) * f.astype(jnp.float32)
        return x0, feats

    def fn(params, x, sigma, cond):
        x = x.astype(jnp.float32)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        if guidance_scale == 1.0 or num_classes == 0 or cond is None:
            return net_call(params, x, sigma, cond)
        b = x.shape[0]
        both = jnp.concatenate([cond, jnp.full_like(cond, num_classes)])
        x0, feats = net_call(params, jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]), both)
        d_c, d_u = x0[:b], x0[b:]
        return d_u + guidance_scale * (d_c - d_u), [f[:b] for f in feats]

    return fn


def input_features(x_t: jax.Array, sigma: jax.Array, sigma_data: float = 0.5) -> list[jax.Array]:
    """The noisy input itself, scaled to unit variance: a feature-free extractor (toys)."""
    scale = jax.lax.rsqrt(jnp.asarray(sigma, jnp.float32) ** 2 + sigma_data**2)
    return [expand_to(scale, x_t) * x_t]


__all__ = ["DenoiseFeats", "input_features", "make_denoise_feats", "unet_features"]
