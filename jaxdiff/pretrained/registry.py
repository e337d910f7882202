"""Converted weight files: write them, read them back into a module with its params.

A converted file is a safetensors file (see :mod:`jaxdiff.pretrained.weights_io`) whose
tensors are the Flax params flattened with ``/`` (``block_0/attn/qkv/kernel``) and whose
metadata holds:

* ``jaxdiff.format``: :data:`FORMAT`;
* ``jaxdiff.config``: the architecture config as JSON (``arch``, ``sample_shape``,
  ``num_classes`` and whatever the architecture's ``build`` needs);
* ``jaxdiff.source`` / ``jaxdiff.source_sha256``: the name and hash of the original
  checkpoint it came from;
* ``jaxdiff.sha256``: the hash of the data, checked on every read.

Each architecture module (:mod:`~jaxdiff.pretrained.dit`, :mod:`~jaxdiff.pretrained.edm2`,
:mod:`~jaxdiff.pretrained.vae`) provides ``infer_config``, ``build`` and
``params_from_torch``; this module only dispatches on ``config["arch"]``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import Formulation
from jaxdiff.models.dit_layout import to_layout
from jaxdiff.pretrained.weights_io import StateDict, WeightsError, read_weights, write_weights
from jaxdiff.utils.trees import flatten_tree, unflatten_tree

FORMAT = "jaxdiff-pretrained-v1"
"""Value of the ``jaxdiff.format`` metadata key of converted files."""

ARCH_MODULES: dict[str, str] = {
    "dit": "jaxdiff.pretrained.dit",
    "sit": "jaxdiff.pretrained.dit",
    "edm2": "jaxdiff.pretrained.edm2",
    "vae": "jaxdiff.pretrained.vae",
}
"""The module implementing each architecture's converter, imported on first use."""


def arch_module(arch: str) -> ModuleType:
    """The converter module of ``arch``.

    Raises:
      WeightsError: For an unknown architecture, listing the known ones.
    """
    if arch not in ARCH_MODULES:
        raise WeightsError(f"unknown architecture {arch!r}; known: {sorted(ARCH_MODULES)}")
    return importlib.import_module(ARCH_MODULES[arch])


def detect_arch(keys: list[str], name: str = "") -> str:
    """Guesses the architecture of a PyTorch state dict from its key names.

    DiT and SiT checkpoints share every key name; a file name containing ``sit`` picks
    SiT, anything else DiT (pass ``--arch`` to say otherwise).

    Raises:
      WeightsError: If no known architecture has these keys.
    """
    keyset = set(keys)
    if "x_embedder.proj.weight" in keyset:
        return "sit" if "sit" in os.path.basename(name).lower() else "dit"
    if "encoder.conv_in.weight" in keyset and "decoder.conv_in.weight" in keyset:
        return "vae"
    if any(k.startswith("unet.") for k in keyset) or "enc.64x64_conv.weight" in keyset:
        return "edm2"
    raise WeightsError(
        f"{name or 'the checkpoint'}: cannot tell its architecture from its keys "
        f"(first keys: {sorted(keyset)[:4]}); pass --arch (one of {sorted(ARCH_MODULES)})"
    )


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flattens a nested param dict to ``{"a/b/c": array}`` (the file's tensor names)."""
    return flatten_tree(params)


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of :func:`flatten_params`."""
    return unflatten_tree(flat)


def abstract_params(module: nn.Module, config: Mapping[str, Any]) -> Any:
    """The boxed param shapes of a built module (no initialiser runs).

    Denoisers are initialised as ``module.init(key, x, noise_label, cond)``; modules with
    another signature (the VAE) provide ``init_args(config)`` in their converter module.
    """
    mod = arch_module(config["arch"])
    if hasattr(mod, "init_args"):
        args = mod.init_args(config)
    else:
        shape = (1, *config["sample_shape"])
        cond = jnp.zeros((1,), jnp.int32) if config.get("num_classes", 0) else None
        args = (jnp.zeros(shape, jnp.float32), jnp.zeros((1,), jnp.float32), cond)
    return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


def check_params(params: Any, abstract: Any, source: str) -> None:
    """Checks loaded params against the module's expected shapes, naming any bad key.

    Raises:
      WeightsError: For a missing, unexpected or wrong-shaped parameter.
    """
    want = {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(abstract))
    }
    have = flatten_params(params)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing:
        raise WeightsError(f"{source}: missing parameter {missing[0]!r} ({len(missing)} in all)")
    if extra:
        raise WeightsError(f"{source}: unexpected parameter {extra[0]!r} ({len(extra)} in all)")
    for name, shape in want.items():
        if tuple(have[name].shape) != tuple(shape):
            raise WeightsError(
                f"{source}: parameter {name!r} has shape {tuple(have[name].shape)}, "
                f"expected {tuple(shape)}"
            )


@dataclasses.dataclass
class Pretrained:
    """A published network loaded from a converted file.

    Attributes:
      config: The architecture config stored in the file.
      model: The Flax module.
      formulation: How it becomes a denoiser (None for the VAE).
      params: Float32 numpy params (unboxed), shaped as ``model.init`` makes them.
      boxed: The boxed abstract params (logical axis names, for shardings).
      metadata: The file's metadata.
      path: Where it was read from.
    """

    config: dict[str, Any]
    model: nn.Module
    formulation: Formulation | None
    params: Any
    boxed: Any
    metadata: dict[str, str]
    path: str

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``(H, W, C)``."""
        return tuple(self.config["sample_shape"])

    @property
    def num_classes(self) -> int:
        """Number of classes (0 = unconditional)."""
        return int(self.config.get("num_classes", 0))


def save_converted(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    params: Mapping[str, Any],
    *,
    source: str = "",
    source_sha256: str = "",
) -> str:
    """Writes a converted file; returns the data's SHA-256."""
    meta = {
        "jaxdiff.format": FORMAT,
        "jaxdiff.config": json.dumps(dict(config), sort_keys=True),
        "jaxdiff.source": os.path.basename(source),
        "jaxdiff.source_sha256": source_sha256,
    }
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
    return write_weights(path, flat, meta)


def load_pretrained(path: str | os.PathLike, **overrides: Any) -> Pretrained:
    """Reads a converted file into its module and params.

    Args:
      path: A file written by ``python -m jaxdiff.pretrained.convert`` (local or bucket).
      **overrides: Config fields to replace before building, e.g. ``dtype="bfloat16"``
        where the architecture supports it.

    Returns:
      The :class:`Pretrained` model.

    Raises:
      WeightsError: If the file is not a converted jaxdiff file (a raw PyTorch checkpoint
        says to convert it), fails its checksum, or its params do not fit its config.

    Example:
      >>> dit = load_pretrained("weights/dit-xl2-256.safetensors")  # doctest: +SKIP
    """
    path = str(path)
    tensors, meta = read_weights(path)
    if meta.get("jaxdiff.format") != FORMAT:
        raise WeightsError(
            f"{path} is not a converted jaxdiff file (no '{FORMAT}' metadata); convert the "
            f"original checkpoint with `python -m jaxdiff.pretrained.convert --src ORIGINAL "
            f"--dst {os.path.basename(path)}`"
        )
    try:
        config = dict(json.loads(meta["jaxdiff.config"]))
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable config metadata ({e})") from None
    config.update(overrides)
    model, formulation = arch_module(config.get("arch", "?")).build(config)
    boxed = abstract_params(model, config)
    params = unflatten_params(tensors)
    if getattr(model, "scan_blocks", False):  # files hold DiT blocks unrolled (block_i)
        params = to_layout(params, scanned=True)
    check_params(params, boxed, path)
    return Pretrained(config, model, formulation, params, boxed, meta, path)


def load_vae(
    path: str | os.PathLike,
    scaling: Any = None,
    *,
    batch_size: int = 16,
    fallback_scaling: Any = None,
) -> Any:
    """A converted VAE file as a batched encoder/decoder (:class:`.vae_handle.PretrainedVAE`).

    Args:
      path: A VAE converted by ``python -m jaxdiff.pretrained.convert``.
      scaling: The diffusion model's :class:`~jaxdiff.pretrained.vae.LatentScaling`; None
        takes the file's own ``scaling_factor``.
      batch_size: Images per jitted call.
      fallback_scaling: Used when ``scaling`` is None and the file has no
        ``scaling_factor`` (weights converted without a diffusers ``config.json``).

    Raises:
      WeightsError: If the file holds another architecture.
    """
    from jaxdiff.pretrained.vae_handle import PretrainedVAE

    pre = load_pretrained(path)
    if pre.config["arch"] != "vae":
        raise WeightsError(
            f"{path} holds a {pre.config['arch']!r} network, not a VAE: convert the VAE's "
            "diffusion_pytorch_model.safetensors and pass that file"
        )
    if scaling is None and pre.config.get("scaling_factor") is None:
        scaling = fallback_scaling
    return PretrainedVAE.from_params(pre.config, pre.params, scaling, batch_size=batch_size)


def convert_state_dict(
    tensors: Mapping[str, np.ndarray],
    *,
    arch: str | None = None,
    extra: Mapping[str, Any] | None = None,
    source: str = "<memory>",
    **config_overrides: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Maps a PyTorch state dict onto jaxdiff params.

    Args:
      tensors: Flat ``{torch_key: array}``.
      arch: Architecture; None detects it from the keys (:func:`detect_arch`).
      extra: Side information from the checkpoint (e.g. EDM2's constructor kwargs).
      source: File name used in error messages.
      **config_overrides: Fields set on the inferred config (e.g. ``sample_shape``).

    Returns:
      ``(config, params)``.

    Raises:
      WeightsError: Naming the key that does not fit.
    """
    arch = arch or detect_arch(list(tensors), source)
    mod = arch_module(arch)
    config = dict(mod.infer_config(StateDict(tensors, source), {**(extra or {}), "arch": arch}))
    config.update(config_overrides)
    sd = StateDict(tensors, source)
    params = mod.params_from_torch(sd, config)
    model, _ = mod.build(config)
    check_params(params, abstract_params(model, config), source)
    return config, params


__all__ = [
    "ARCH_MODULES",
    "FORMAT",
    "Pretrained",
    "abstract_params",
    "arch_module",
    "check_params",
    "convert_state_dict",
    "detect_arch",
    "flatten_params",
    "load_pretrained",
    "load_vae",
    "save_converted",
    "unflatten_params",
]
