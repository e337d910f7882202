"""A trained run as sampling sees it: :func:`load_run` restores config + one set of params.

It reads only ``workdir/checkpoints`` (the config is stored beside every checkpoint),
never the training data, and never the optimizer state: only the chosen EMA copy (or the
raw params) is read, straight onto the shardings of the mesh it is given, whatever device
count the run was trained on.

A distilled few-step student's ``config.sample`` holds its sampling recipe (``solver =
"renoise"``, ``sigmas`` = its trained levels); one saved before students stored it gets
the same recipe from its ``distill_config``
(:func:`jaxdiff.experiment.sampling.with_student_recipe`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from jaxdiff.diffusion import Formulation
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.builders import (
    RUN_KEY,
    build_formulation,
    build_model,
    build_precision,
)
from jaxdiff.experiment.sampling import with_student_recipe
from jaxdiff.models import to_layout
from jaxdiff.parallel import make_mesh, param_shardings, put_global
from jaxdiff.training.checkpoint import Checkpointer, load_config
from jaxdiff.training.phema import check_std, read_reconstruction, reconstruction_path
from jaxdiff.training.state import ema_keys, init_params_fn
from jaxdiff.utils import storage

log = logging.getLogger(__name__)

PHEMA_PREFIX = "phema:"
"""``load_run(workdir, ema="phema:0.1")`` loads a post-hoc EMA reconstruction."""


@dataclasses.dataclass
class TrainedModel:
    """A restored run: its config, network, formulation and chosen params.

    Attributes:
        config: the training config.
        model: the network.
        formulation: its formulation.
        params: the chosen params (an EMA copy by default), sharded on ``mesh``.
        num_classes: classes (0 = unconditional; null class id = ``num_classes``).
        sample_shape: shape of one sample.
        step: the checkpoint's training step.
        mesh: the mesh the params live on.
        param_shardings: their NamedShardings (from the model's logical axes).
        which: which params: an EMA key such as ``"0.999"``, or ``"params"``.
        latent: for a run trained on encoded latents, their scaling
            (``{"scale", "shift", "pixel_range"}``), to decode samples through a VAE.
    """

    config: ml_collections.ConfigDict
    model: nn.Module
    formulation: Formulation
    params: Any
    num_classes: int
    sample_shape: tuple[int, ...]
    step: int
    mesh: Any = None
    param_shardings: Any = None
    which: str = "params"
    latent: dict | None = None


def _stored_config(ckpt_dir: str, workdir: Any, step: int | None = None) -> dict:
    stored = load_config(ckpt_dir, step)
    if stored is None:
        raise FileNotFoundError(
            f"no checkpoint in {ckpt_dir}: train one first with "
            f"`python -m train --workdir={workdir}`, or pass the workdir of a finished run"
        )
    return stored


def _load_phema(workdir: Any, ema: str, abstract: Any) -> tuple[Any, int, str]:
    """``(params, step, name)`` of reconstruction ``ema="phema:STD"``, placed as ``abstract``."""
    text = ema[len(PHEMA_PREFIX) :]
    try:
        std = float(text)
    except ValueError:
        raise InvalidArgumentError(
            f"ema={ema!r}: STD in '{PHEMA_PREFIX}STD' must be a number, e.g. {PHEMA_PREFIX}0.1"
        ) from None
    std = check_std(std, f"the relative std of ema={ema!r}")
    path = reconstruction_path(storage.join(workdir, "phema"), std)
    if not storage.isfile(path):
        raise FileNotFoundError(
            f"no post-hoc EMA reconstruction {path}: make it first with `python -m "
            f"jaxdiff.experiment.phema --workdir={workdir} --std={std}`"
        )
    host, meta = read_reconstruction(path, abstract)
    params = put_global(host, jax.tree.map(lambda a: a.sharding, abstract))
    return params, int(meta["step"]), f"{PHEMA_PREFIX}{std:.3f}"


def _with_precision(
    config: ml_collections.ConfigDict, precision: str | None
) -> ml_collections.ConfigDict:
    """``config`` with ``precision`` as its preset (unchanged when None)."""
    if precision is None:
        return config
    config.precision = precision
    build_precision(config)  # names the presets if this one is unknown
    if "dtype" in config.model:
        config.model.dtype = None
    return config


def load_run(
    workdir: str | os.PathLike,
    *,
    ema: str | None = "default",
    mesh: Any = None,
    precision: str | None = None,
    scan_blocks: bool | None = None,
) -> TrainedModel:
    """Restores the newest readable checkpoint of a run: config plus one set of params.

    Args:
        workdir: the run's workdir (holding ``checkpoints/``); a ``gs://`` path works.
            A converted ``.safetensors`` file of a published network (``python -m
            jaxdiff.pretrained.convert``) loads that network instead (``ema`` is ignored).
        ema: which params: ``"default"`` (the first EMA rate, else the first power profile,
            or the raw params if the run kept none), an EMA rate such as ``"0.999"``, a
            power profile such as ``"std0.100"``, ``"phema:STD"`` for the post-hoc EMA
            reconstruction ``WORKDIR/phema/reconstructed-stdSTD.safetensors`` written by
            ``python -m jaxdiff.experiment.phema`` (its step is the reconstruction's), or
            None for the raw params.
        mesh: the mesh to shard the params onto, by the model's logical axis rules
            (e.g. ``make_mesh(data=2, fsdp=2)``); default one device.
        precision: a ``config.precision`` preset (``"default"``, ``"fp32"``, ``"bf16"``)
            to sample with instead of the run's own; it also clears the run's
            ``model.dtype``, so the preset decides the compute dtype. Params stay float32.
        scan_blocks: for a DiT run, the block layout to load into (None: the run's own).
            Checkpoints of either layout load into either; the params are restacked or
            split after reading (see :func:`jaxdiff.models.to_layout`).

    Returns:
        The restored model.

    Raises:
        FileNotFoundError: if ``workdir`` holds no checkpoint (says how to train one), or
            the asked-for reconstruction was not made (says how to make it).
        InvalidArgumentError: for an EMA rate the run did not keep.

    Example:
        >>> run = load_run("runs/digits", mesh=make_mesh())  # doctest: +SKIP
    """
    if str(workdir).lower().endswith(".safetensors"):  # a converted published network
        from jaxdiff.experiment.pretrained import load_pretrained_run

        return load_pretrained_run(workdir, mesh=mesh)
    ckpt_dir = storage.join(workdir, "checkpoints")
    stored = _stored_config(ckpt_dir, workdir)
    meta = stored.pop(RUN_KEY)
    config = _with_precision(ml_collections.ConfigDict(stored), precision)
    num_classes, shape = int(meta["num_classes"]), tuple(meta["sample_shape"])
    rates = ema_keys(config.train.ema_rates, config.train.get("ema_stds", ()))
    if ema == "default":
        ema = rates[0] if rates else None
    phema = ema is not None and ema.startswith(PHEMA_PREFIX)
    if ema is not None and not phema and ema not in rates:
        raise InvalidArgumentError(
            f"EMA {ema!r} not in this run: it kept {rates}; pass one of them, 'default', "
            f"'{PHEMA_PREFIX}STD' for a post-hoc EMA reconstruction, or 'none' for the raw params"
        )
    model = build_model(config, num_classes)
    mesh = make_mesh(devices=jax.devices()[:1]) if mesh is None else mesh
    boxed = jax.eval_shape(init_params_fn(model, shape, num_classes), jax.random.key(0))
    shardings = param_shardings(boxed, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    if phema:
        params, step, ema = _load_phema(workdir, ema, abstract)
    else:
        item = {"params": abstract} if ema is None else {"ema": {ema: abstract}}
        ckpt = Checkpointer(ckpt_dir)
        try:
            restored, step = ckpt.restore_subtree(item)
            newest = ckpt.latest_step()
        finally:
            ckpt.close()
        params = restored["params"] if ema is None else restored["ema"][ema]
        if step != newest:  # fell back: read the config that belongs to that step
            stored = _stored_config(ckpt_dir, workdir, step)
            stored.pop(RUN_KEY)
            config = _with_precision(ml_collections.ConfigDict(stored), precision)
    if scan_blocks is not None and bool(getattr(model, "scan_blocks", scan_blocks)) != scan_blocks:
        config.model.scan_blocks = bool(scan_blocks)
        model = build_model(config, num_classes)
        boxed = jax.eval_shape(init_params_fn(model, shape, num_classes), jax.random.key(0))
        shardings = param_shardings(boxed, mesh)
        params = put_global(to_layout(params, scanned=bool(scan_blocks)), shardings)
    return TrainedModel(
        config=with_student_recipe(config),  # a student saved before it stored its recipe
        model=model,
        formulation=build_formulation(config),
        params=params,
        num_classes=num_classes,
        sample_shape=shape,
        step=step,
        mesh=mesh,
        param_shardings=shardings,
        which="params" if ema is None else ema,
        latent=meta.get("latents"),
    )


__all__ = ["TrainedModel", "load_run"]
