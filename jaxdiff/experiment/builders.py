"""Config -> library objects: model, formulation, optimizer, mesh, data, run metadata.

Every ``config.model`` / ``config.formulation`` / ``config.optim`` / ``config.mesh`` /
``config.data`` key is read here and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jaxdiff.data import (
    Augmentation,
    EdmAugment,
    LatentSource,
    get_dataset,
    make_iterator,
    random_flip,
)
from jaxdiff.diffusion import Formulation, get_formulation
from jaxdiff.distill.consistency_core import ConsistencyFormulation
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.repa import repa_model
from jaxdiff.models import create_model
from jaxdiff.parallel import batch_size_per_device_check, make_mesh
from jaxdiff.training.checkpoint import Checkpointer
from jaxdiff.training.lock import WorkdirLock
from jaxdiff.training.optim import SCHEDULES, make_optimizer
from jaxdiff.training.phema import STD_MAX
from jaxdiff.utils import storage

RUN_KEY = "_run"
"""Key of the run metadata (classes, sample shape) stored in every checkpoint's config."""


def _section_kwargs(section: ml_collections.ConfigDict) -> dict[str, Any]:
    kwargs = section.to_dict()
    kwargs.pop("name", None)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


@dataclasses.dataclass(frozen=True)
class Precision:
    """A numerics preset: what the network computes in and how float32 matmuls run.

    Attributes:
        name: the preset's name (``config.precision``).
        compute_dtype: dtype of the network's activations and matmul inputs (parameters,
            optimizer state, EMA and sampler state stay float32 in every preset).
        matmul_precision: ``jax.default_matmul_precision`` for float32 matmuls, or None
            for the backend's default.
    """

    name: str
    compute_dtype: Any
    matmul_precision: str | None

    def scope(self) -> contextlib.AbstractContextManager:
        """A context in which jitted code traces with this preset's matmul precision."""
        if self.matmul_precision is None:
            return contextlib.nullcontext()
        return jax.default_matmul_precision(self.matmul_precision)


PRECISIONS: dict[str, Precision] = {
    # float32 activations; float32 matmuls as the backend does them by default: TF32 on
    # Ampere and newer GPUs, bf16 passes on TPU, true float32 on CPU.
    "default": Precision("default", jnp.float32, None),
    # float32 everywhere, matmuls included: parity checks against float32 references.
    "fp32": Precision("fp32", jnp.float32, "highest"),
    # bfloat16 activations and matmul inputs with float32 params: the fast path on GPU/TPU.
    "bf16": Precision("bf16", jnp.bfloat16, None),
}
"""The ``config.precision`` presets."""

DTYPES: dict[str, Any] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
"""Accepted ``config.model.dtype`` names."""


def build_precision(config: ml_collections.ConfigDict) -> Precision:
    """The preset of ``config.precision`` (``"default"`` when the config has none).

    Raises:
        InvalidArgumentError: for an unknown preset name.
    """
    name = config.get("precision", "default") or "default"
    _require(name in PRECISIONS, "precision", name, f"one of {list(PRECISIONS)}")
    return PRECISIONS[name]


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """The network's compute dtype: ``config.model.dtype`` if set, else the preset's.

    Raises:
        InvalidArgumentError: for an unknown dtype name.
    """
    name = config.model.get("dtype")
    if name is None:
        return build_precision(config).compute_dtype
    _require(name in DTYPES, "model.dtype", name, f"one of {list(DTYPES)} (or None)")
    return DTYPES[name]


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The network of ``config.model`` (``name`` plus the module's fields).

    The compute dtype comes from ``config.model.dtype`` or the ``config.precision``
    preset; parameters are always float32.
    """
    kwargs = _section_kwargs(config.model)
    kwargs["dtype"] = compute_dtype(config)
    model = create_model(config.model.name, num_classes=num_classes, **kwargs)
    # REPA's projector is part of the model (params created at init, restored by load_run).
    return repa_model(config, model)


CONSISTENCY_KEY = "consistency"
"""``config.formulation.consistency = {"sigma_min", "sigma_data"}`` marks a consistency
student: the formulation is wrapped in
:class:`~jaxdiff.distill.consistency_core.ConsistencyFormulation` (``f(x, sigma_min) = x``)."""


def build_formulation(config: ml_collections.ConfigDict) -> Formulation:
    """The formulation of ``config.formulation`` (``name`` plus its fields).

    A consistency student's section also holds ``consistency`` (:data:`CONSISTENCY_KEY`):
    its base formulation is then wrapped so it denoises exactly as it was trained.
    """
    kwargs = _section_kwargs(config.formulation)
    consistency = kwargs.pop(CONSISTENCY_KEY, None)
    base = get_formulation(config.formulation.name, **kwargs)
    if consistency is None:
        return base
    return ConsistencyFormulation(base, **dict(consistency))


def build_optimizer(
    section: ml_collections.ConfigDict, key: str = "optim"
) -> optax.GradientTransformation:
    """The optimizer of an optimizer section (``config.optim``, ``config.critic_optim``).

    Args:
        section: the section; ``schedule`` is one of ``"cosine"`` (over ``decay_steps``;
            None = no decay), ``"constant"`` and ``"inverse_sqrt"`` (EDM2's; ``decay_steps``
            is its reference step).
        key: the section's name in error messages.

    Raises:
        InvalidArgumentError: for an unknown schedule or a ``decay_steps`` it cannot use.
    """
    kwargs = section.to_dict()
    schedule, decay = kwargs.get("schedule", "cosine"), kwargs.get("decay_steps")
    _require(schedule in SCHEDULES, f"{key}.schedule", schedule, f"one of {list(SCHEDULES)}")
    if decay is not None:
        _require(decay >= 1, f"{key}.decay_steps", decay, ">= 1 (or None)")
    if schedule == "inverse_sqrt":
        want = "an integer >= 1 (the step t_ref after which schedule 'inverse_sqrt' decays)"
        _require(decay is not None, f"{key}.decay_steps", decay, want)
    if schedule == "constant" and decay is not None:
        raise InvalidArgumentError(
            f"config.{key}.schedule='constant' does not decay, but config.{key}.decay_steps="
            f"{decay}: pass --config.{key}.decay_steps=None, or --config.{key}.schedule=cosine"
        )
    return make_optimizer(**kwargs)


def build_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The device mesh of ``config.mesh``, checked against ``config.train.batch_size``."""
    mesh = make_mesh(**config.mesh.to_dict())
    batch_size_per_device_check(config.train.batch_size, mesh)
    return mesh


def _require(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise InvalidArgumentError(
            f"config.{key} must be {want}, got {value!r}: pass --config.{key}=VALUE with a "
            f"value that is {want}"
        )


def check_loop_config(config: ml_collections.ConfigDict) -> None:
    """Validates every ``config.train`` / ``config.sample`` / ``config.eval`` value a run uses.

    Runs before anything is built or restored, so a bad value never costs work.

    Raises:
        InvalidArgumentError: naming the key, its value and the fix.
    """
    tc = config.train
    for name in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        _require(tc[name] >= 1, f"train.{name}", tc[name], ">= 1")
    dropout = tc.get("label_dropout", 0.0)
    _require(0.0 <= dropout <= 1.0, "train.label_dropout", dropout, "a probability in [0, 1]")
    _require(tc.get("sample_every", 0) >= 0, "train.sample_every", tc.get("sample_every"), ">= 0")
    for rate in tc.ema_rates:
        _require(0.0 <= rate < 1.0, "train.ema_rates", tuple(tc.ema_rates), "rates in [0, 1)")
    _check_phema_config(tc)
    sc = config.sample
    _require(sc.grid_size >= 0, "sample.grid_size", sc.grid_size, ">= 0 (0 = no grid)")
    _require(sc.grid_scale >= 1, "sample.grid_scale", sc.grid_scale, ">= 1")
    ec = config.get("eval")
    if ec is not None and ec.name:
        from jaxdiff.experiment.evaluate import EVAL_FILE_OPTIONS, eval_request_problem

        names = [n.strip() for n in ec.name.split(",")]
        files = {k: ec.get(k) for k in EVAL_FILE_OPTIONS if k in ec}
        problem = eval_request_problem(names, "config.eval.{}", **files)
        if problem:
            raise InvalidArgumentError(f"config.eval.name={ec.name!r}: {problem}")
        _require(ec.every >= 0, "eval.every", ec.every, ">= 0")
        _require(ec.num >= 2, "eval.num", ec.num, ">= 2")
        _require(ec.batch_size >= 1, "eval.batch_size", ec.batch_size, ">= 1")


def _check_phema_config(tc: ml_collections.ConfigDict) -> None:
    stds, every = tuple(tc.get("ema_stds", ())), tc.get("phema_every", 0)
    want = f"distinct relative stds in (0, {STD_MAX}) with at most 3 decimals, e.g. (0.05,0.1)"
    for std in stds:
        ok = 0.0 < std < STD_MAX and abs(round(std, 3) - std) < 1e-12
        _require(ok and len(set(stds)) == len(stds), "train.ema_stds", stds, want)
    _require(every >= 0, "train.phema_every", every, ">= 0 (0 = no post-hoc EMA snapshots)")
    if every and not stds:
        raise InvalidArgumentError(
            f"config.train.phema_every={every} snapshots the power-function EMA profiles, but "
            "config.train.ema_stds is empty: pass --config.train.ema_stds=(0.05,0.1) (EDM2's "
            "profiles), or --config.train.phema_every=0"
        )


def build_data(
    config: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict | None = None
) -> tuple[Any, Any, int]:
    """The training data of ``data_config`` (default ``config.data``) for this process.

    Returns:
        ``(source, iterator, num_classes)``: the dataset, this process's checkpointable
        batch iterator of ``config.train.batch_size`` global examples, and the classes the
        model is conditioned on (0 when unconditional).

    Raises:
        InvalidArgumentError: for a conditional config on a dataset without labels.
    """
    dc = config.data if data_config is None else data_config
    source = get_dataset(
        dc.name,
        split="train",
        data_dir=dc.get("data_dir"),
        path=dc.get("path"),
        image_size=dc.get("image_size"),
        skip_corrupt=bool(dc.get("skip_corrupt", False)),
        # Only dataset "latents" reads these (see train/configs/common.py).
        latents=dc.get("latents", "sample"),
        latent_flip=dc.get("random_flip", False),
        latent_scale=dc.get("latent_scale"),
        latent_shift=dc.get("latent_shift"),
    )
    conditional = dc.get("conditional", True)
    if conditional is None:  # "auto": class-conditional exactly when the data has labels
        conditional = bool(source.info.num_classes)
    if conditional and not source.info.num_classes:
        raise InvalidArgumentError(
            f"config.data.conditional=True but dataset {dc.name!r} has no labels: "
            "set --config.data.conditional=False"
        )
    data = make_iterator(
        source,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        augment=build_augmentation(config, dc, source),
        workers=_workers(dc),
    )
    return source, data, (source.info.num_classes or 0) if conditional else 0


def _workers(dc: ml_collections.ConfigDict) -> int:
    workers = dc.get("workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InvalidArgumentError(
            f"config.data.workers={workers!r} must be an integer >= 0 (input worker "
            "processes; 0 decodes in the training process): set --config.data.workers=N"
        )
    return workers


def build_augmentation(
    config: ml_collections.ConfigDict, dc: ml_collections.ConfigDict, source: Any = None
) -> Augmentation | None:
    """The host-side augmentation ``config.data`` asks for, checked against the model.

    ``data.random_flip`` mirrors half the images; ``data.augment="edm"`` is EDM's
    non-leaking pipeline at probability ``data.augment_p``, whose labels the network must
    take (``model.augment_dim=9``). Encoded latents (a :class:`LatentSource`) get the
    source's own augmentation: posterior samples (``data.latents="sample"``) and the
    stored mirrored-image latents (``data.random_flip``), never a flip of the latents.

    Raises:
        InvalidArgumentError: for an unknown augmentation, flip together with ``edm`` (it
            flips already), ``edm`` on latents, or a model that cannot see EDM's augment
            labels.
    """
    name, flip = dc.get("augment", "") or "", bool(dc.get("random_flip", False))
    if isinstance(source, LatentSource):
        if name:
            raise InvalidArgumentError(
                f"config.data.augment={name!r} transforms pixels, not VAE latents: set "
                "--config.data.augment='' (flips come from encode --flip and "
                "config.data.random_flip)"
            )
        return source.augmentation
    if name not in ("", "edm"):
        raise InvalidArgumentError(
            f"unknown config.data.augment={name!r}: use 'edm' (EDM's augmentation pipe) "
            "or '' for none"
        )
    if not name:
        return random_flip if flip else None
    if flip:
        raise InvalidArgumentError(
            "config.data.augment='edm' already flips images: set --config.data.random_flip=False"
        )
    augment = EdmAugment(p=float(dc.get("augment_p", 0.12)))
    dim = config.model.get("augment_dim", 0)
    if dim != augment.label_dim:
        raise InvalidArgumentError(
            f"config.data.augment='edm' feeds {augment.label_dim} augment labels to the "
            f"network, but config.model.augment_dim={dim}: set "
            f"--config.model.augment_dim={augment.label_dim} (UNet only)"
        )
    return augment


def lock_workdir(workdir: str | os.PathLike) -> contextlib.AbstractContextManager:
    """The writer's lock on ``workdir`` (process 0 holds it for a multi-process job).

    Creates the workdir. Enter the returned context before restoring anything.

    Raises:
        InvalidArgumentError: if ``workdir`` is a file or cannot be created or written.
    """
    path = storage.to_str(workdir)
    if not storage.is_remote(path):
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".jaxdiff.write-test.{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise InvalidArgumentError(
                f"--workdir={path} cannot be used as a run directory ({type(e).__name__}: "
                f"{e.strerror or e}): pass a writable directory path"
            ) from e
    return WorkdirLock(path) if jax.process_index() == 0 else contextlib.nullcontext()


def check_resume(ckpt: Checkpointer, start: int, num_steps: int) -> None:
    """Checks, before the first step, that a resumed run can go on and save.

    Raises:
        InvalidArgumentError: if ``num_steps`` is below the restored step.
        FileExistsError: if an entry in the checkpoint directory would block later saves.
    """
    if start > num_steps:
        raise InvalidArgumentError(
            f"config.train.num_steps={num_steps} is below step {start}, restored from "
            f"{ckpt.directory}: pass --config.train.num_steps=N with N > {start} to train "
            "on, or use another --workdir"
        )
    ckpt.check_can_save(start)


def run_metadata(
    num_classes: int, sample_shape: tuple[int, ...], latents: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What sampling needs to rebuild the model without opening the dataset.

    ``latents`` (runs on encoded latents) records their scaling, so samples can be
    decoded through a VAE later.
    """
    meta = {"num_classes": int(num_classes), "sample_shape": [int(d) for d in sample_shape]}
    if latents is not None:
        meta["latents"] = latents
    return meta


def latent_metadata(source: Any) -> dict[str, Any] | None:
    """The scaling of a :class:`~jaxdiff.data.LatentSource` (None for other sources)."""
    if not isinstance(source, LatentSource):
        return None

    def as_list(v: Any) -> list[float]:
        return np.asarray(v, np.float64).reshape(-1).tolist()

    return {
        "scale": as_list(source.scale),
        "shift": as_list(source.shift),
        "pixel_range": source.metadata.get("latents", {}).get("pixel_range", [-1.0, 1.0]),
    }


__all__ = [
    "DTYPES",
    "PRECISIONS",
    "RUN_KEY",
    "Precision",
    "build_precision",
    "compute_dtype",
    "build_data",
    "CONSISTENCY_KEY",
    "build_formulation",
    "build_mesh",
    "build_model",
    "build_optimizer",
    "latent_metadata",
    "check_loop_config",
    "check_resume",
    "lock_workdir",
    "run_metadata",
]
