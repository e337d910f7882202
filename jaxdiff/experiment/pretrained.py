"""Published networks as runs: a converted weight file samples like a trained workdir.

:func:`load_pretrained_run` turns a file written by ``python -m jaxdiff.pretrained.convert``
into the same :class:`~jaxdiff.experiment.runs.TrainedModel` that :func:`.runs.load_run` returns
for a workdir, with a sampler config that follows the model's paper, so
``python -m sample --workdir=dit-xl2-256.safetensors --guidance=apg:...`` and
``guide=edm2-img512-xs.safetensors`` work like their workdir forms.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from jaxdiff.experiment.runs import TrainedModel
from jaxdiff.parallel import make_mesh, param_shardings
from jaxdiff.pretrained.registry import Pretrained, load_pretrained
from jaxdiff.pretrained.weights_io import WeightsError

WEIGHT_SUFFIXES = (".safetensors",)
"""File endings that mark a converted weight file rather than a workdir."""

# Each paper's own sampler, in jaxdiff's terms. DiT's sample.py draws 250 DDPM steps with
# CFG 4.0 (its FID-50K uses 1.5); a 32-step Heun ODE over the same sigma range is the
# deterministic equivalent. EDM2's generate_images.py: 32 Heun steps, sigma in
# [0.002, 80], rho 7; its conditional nets have no null class, so plain CFG is off (use
# autoguidance with an unconditional or smaller guide=, as EDM2 does).
SAMPLE_DEFAULTS: dict[str, dict[str, Any]] = {
    # The discrete DDPM table spans sigma 0.0100005 (step 0) to 157.407 (step 999).
    "dit": dict(solver="heun", steps=32, sigma_min=0.0101, sigma_max=157.0, rho=7.0,
                guidance="cfg:4.0"),
    "sit": dict(solver="heun", steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                guidance="cfg:4.0"),
    "edm2": dict(solver="heun", steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 guidance="none"),
}  # fmt: skip


def is_weights_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a converted weight file (by its suffix)."""
    return str(path).lower().endswith(WEIGHT_SUFFIXES)


def sample_config(pre: Pretrained) -> ml_collections.ConfigDict:
    """The run-style config of a pretrained model: its sampler and where it came from."""
    arch = pre.config["arch"]
    if arch not in SAMPLE_DEFAULTS:
        raise WeightsError(
            f"{pre.path} holds a {arch!r} network, which does not sample; pass a diffusion "
            f"model ({', '.join(sorted(SAMPLE_DEFAULTS))})"
        )
    sample = dict(SAMPLE_DEFAULTS[arch], grid_size=16, grid_scale=1)
    if not pre.num_classes:
        sample["guidance"] = "none"
    return ml_collections.ConfigDict(
        {
            "sample": sample,
            "train": {"ema_rates": ()},
            "pretrained": {"path": pre.path, "arch": arch, "config": dict(pre.config)},
        }
    )


def load_pretrained_run(
    path: str | os.PathLike, *, mesh: Any = None, **overrides: Any
) -> TrainedModel:
    """Loads a converted weight file as a run, params sharded on ``mesh``.

    Args:
      path: A converted ``.safetensors`` file (local or bucket).
      mesh: Mesh to shard the params onto by their logical axes; default one device.
      **overrides: Architecture config overrides (see :func:`load_pretrained`).

    Returns:
      A :class:`TrainedModel` with ``step=0`` and ``which="pretrained"``.

    Raises:
      WeightsError: For a file that is not a converted diffusion model.
    """
    pre = load_pretrained(path, **overrides)
    config = sample_config(pre)
    mesh = make_mesh(devices=jax.devices()[:1]) if mesh is None else mesh
    shardings = param_shardings(pre.boxed, mesh)
    params = jax.tree.map(jax.device_put, pre.params, shardings)
    return TrainedModel(
        config=config,
        model=pre.model,
        formulation=pre.formulation,
        params=params,
        num_classes=pre.num_classes,
        sample_shape=pre.sample_shape,
        step=0,
        mesh=mesh,
        param_shardings=shardings,
        which="pretrained",
    )


__all__ = ["SAMPLE_DEFAULTS", "is_weights_file", "load_pretrained_run", "sample_config"]
