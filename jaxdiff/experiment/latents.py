"""Latent models as image models: find a run's latent scaling and decode through a VAE.

A latent diffusion model samples *scaled* latents ``z = (raw - shift) * scale``; the scale
and shift belong to the model (DiT multiplies by 0.18215, EDM2 standardises each channel),
not to the VAE file. :func:`latent_scaling` finds them for a run (a converted published
network, or a run trained on latents from ``python -m jaxdiff.pretrained.encode``), and
:func:`run_vae` pairs them with a converted VAE file, whose ``decode`` maps
``latents -> images in [-1, 1]`` for grids, ``.npz`` files and metrics.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.runs import TrainedModel
from jaxdiff.parallel import replicated
from jaxdiff.pretrained.registry import load_vae
from jaxdiff.pretrained.vae import LATENT_SCALINGS, LatentScaling
from jaxdiff.pretrained.vae_handle import PretrainedVAE

LATENT_KEY = "latents"
"""Key of the run metadata (``_run``) that records a latent run's scaling and VAE."""


def scaling_from_dict(d: Mapping[str, Any]) -> LatentScaling:
    """A :class:`LatentScaling` from ``{"scale", "shift"[, "pixel_range"]}``."""
    kw = {k: d[k] for k in ("scale", "shift", "pixel_range") if d.get(k) is not None}
    for k in ("scale", "shift", "pixel_range"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    return LatentScaling(**kw)


def latent_scaling(run: TrainedModel) -> LatentScaling | None:
    """The latent scaling a run samples in, or None for a pixel-space model.

    * converted DiT/SiT: 0.18215 (``latent_scale`` of the file's config);
    * converted EDM2 latent networks: EDM2's per-channel standardisation;
    * runs trained on encoded latents: what training used, recorded in the run.
    """
    pre = run.config.get("pretrained")
    if pre is not None:
        cfg = dict(pre.config)
        if cfg["arch"] in ("dit", "sit") and cfg.get("latent_scale"):
            return LatentScaling(float(cfg["latent_scale"]))
        if cfg["arch"] == "edm2" and run.sample_shape[-1] == 4:
            return LATENT_SCALINGS["edm2"]
        return None
    latent = getattr(run, "latent", None)
    return scaling_from_dict(latent) if latent else None


def decoded_generate(
    generate: Callable[..., Any], run: TrainedModel, vae: PretrainedVAE | None
) -> tuple[Callable[..., Any], Any, Any]:
    """Fuses VAE decoding into a ``generate(params, labels, keys)`` function.

    Returns ``(generate, params, param_shardings)`` to hand to the sharded batching loop:
    unchanged without a VAE; with one, the params become ``(model, vae)`` (the VAE's
    replicated) and every batch is decoded inside the same jitted call, so metrics see
    images without the latents ever leaving the device.
    """
    if vae is None:
        return generate, run.params, run.param_shardings

    def generate_images(params, labels, keys):
        latents, aux = generate(params[0], labels, keys)
        return vae.decode_fn(params[1], latents), aux

    rep = replicated(run.mesh)
    vae_shardings = jax.tree.map(lambda _: rep, vae.params)
    return generate_images, (run.params, vae.params), (run.param_shardings, vae_shardings)


def run_vae(
    run: TrainedModel, vae_path: str | os.PathLike | None, *, batch_size: int = 16
) -> PretrainedVAE | None:
    """The VAE that turns a latent run's samples into images, or None.

    Returns None when ``vae_path`` is None (the caller shows raw channels). The VAE
    decodes with the run's own latent scaling (:func:`latent_scaling`); its ``decode``
    maps ``latents -> images in [-1, 1]`` on the host, its ``decode_fn`` inside a jit.

    Raises:
      InvalidArgumentError: If a VAE is given for a model that is not a latent model.
    """
    if not vae_path:
        return None
    scaling = latent_scaling(run)
    if scaling is None:
        raise InvalidArgumentError(
            f"--vae={vae_path} given, but this model samples pixels, not latents "
            f"(shape {run.sample_shape}): leave --vae out"
        )
    vae = load_vae(vae_path, scaling, batch_size=batch_size)
    if vae.module.latent_channels != run.sample_shape[-1]:
        raise InvalidArgumentError(
            f"--vae={vae_path} has {vae.module.latent_channels} latent channels, the model "
            f"samples {run.sample_shape[-1]}: pass the VAE the model was trained with"
        )
    return vae


__all__ = [
    "LATENT_KEY",
    "decoded_generate",
    "latent_scaling",
    "load_vae",
    "run_vae",
    "scaling_from_dict",
]
