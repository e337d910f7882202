"""Config -> library objects: model, formulation, optimizer, mesh, data, run metadata.

Every ``config.model`` / ``config.formulation`` / ``config.optim`` / ``config.mesh`` /
``config.data`` key is read here and nowhere else.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import Mesh

from jaxdiff.data import get_dataset, make_iterator
from jaxdiff.diffusion import Formulation, get_formulation
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.models import create_model
from jaxdiff.parallel import batch_size_per_device_check, make_mesh
from jaxdiff.training.optim import make_optimizer

RUN_KEY = "_run"
"""Key of the run metadata (classes, sample shape) stored in every checkpoint's config."""


def _section_kwargs(section: ml_collections.ConfigDict) -> dict[str, Any]:
    kwargs = section.to_dict()
    kwargs.pop("name", None)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The network of ``config.model`` (``name`` plus the module's fields)."""
    return create_model(config.model.name, num_classes=num_classes, **_section_kwargs(config.model))


def build_formulation(config: ml_collections.ConfigDict) -> Formulation:
    """The formulation of ``config.formulation`` (``name`` plus its fields)."""
    return get_formulation(config.formulation.name, **_section_kwargs(config.formulation))


def build_optimizer(section: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optimizer of an optimizer section (``config.optim``, ``config.critic_optim``)."""
    return make_optimizer(**section.to_dict())


def build_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The device mesh of ``config.mesh``, checked against ``config.train.batch_size``."""
    mesh = make_mesh(**config.mesh.to_dict())
    batch_size_per_device_check(config.train.batch_size, mesh)
    return mesh


def check_loop_config(config: ml_collections.ConfigDict) -> None:
    """Validates the ``config.train`` values every loop needs.

    Raises:
        InvalidArgumentError: naming the key, its value and the fix.
    """
    tc = config.train
    for name in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if tc[name] < 1:
            raise InvalidArgumentError(
                f"config.train.{name} must be >= 1, got {tc[name]}: set "
                f"--config.train.{name}=N with N >= 1"
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
    source = get_dataset(dc.name, split="train", data_dir=dc.get("data_dir"))
    conditional = bool(dc.get("conditional", True))
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
    )
    return source, data, (source.info.num_classes or 0) if conditional else 0


def run_metadata(num_classes: int, sample_shape: tuple[int, ...]) -> dict[str, Any]:
    """What sampling needs to rebuild the model without opening the dataset."""
    return {"num_classes": int(num_classes), "sample_shape": [int(d) for d in sample_shape]}


__all__ = [
    "RUN_KEY",
    "build_data",
    "build_formulation",
    "build_mesh",
    "build_model",
    "build_optimizer",
    "check_loop_config",
    "run_metadata",
]
