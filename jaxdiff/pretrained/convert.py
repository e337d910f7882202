"""Converts a published checkpoint once into a torch-free jaxdiff weight file.

    python -m jaxdiff.pretrained.convert --src DiT-XL-2-256x256.pt --dst dit-xl2-256.safetensors

Reads PyTorch ``.pt``/``.pth``/``.pkl`` files (DiT, SiT, EDM2) with a restricted
unpickler that needs no torch (:mod:`jaxdiff.pretrained.torch_pickle`), and diffusers
``.safetensors`` files (the SD-VAE) directly. The architecture and its size are read from
the key names and shapes (``--arch`` overrides); every tensor is mapped onto the Flax
params, checked against the module, written with the config and checksums
(:mod:`jaxdiff.pretrained.registry`), read back and run once on random input as a check.
``--sha256`` checks the original file against a hash you trust before anything is read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.pretrained import registry
from jaxdiff.pretrained.weights_io import WeightsError, file_sha256, read_weights
from jaxdiff.utils import storage

TORCH_SUFFIXES = (".pt", ".pth", ".pkl", ".ckpt", ".bin")
"""Extensions read by the torch-free unpickler."""


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What :func:`convert` wrote.

    Attributes:
      dst: The converted file.
      config: The architecture config stored in it.
      num_params: Number of parameters.
      source_sha256: SHA-256 of the original checkpoint.
      sha256: SHA-256 of the converted file's data section.
      entry: Which entry of a checkpoint dict was read (e.g. ``"ema"``), if any.
    """

    dst: str
    config: dict[str, Any]
    num_params: int
    source_sha256: str
    sha256: str
    entry: str | None


def read_checkpoint(
    src: str, entry: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads an original checkpoint into ``(state_dict, extra)`` without torch.

    Args:
      src: ``.pt``/``.pth``/``.pkl``/``.ckpt``/``.bin`` (PyTorch) or ``.safetensors``.
      entry: For checkpoint dicts, the entry holding the weights (``"ema"``, ``"model"``);
        None picks ``"ema"`` when present.

    Raises:
      WeightsError: For an unknown extension or an unreadable file.
    """
    lower = src.lower()
    if lower.endswith((".safetensors", ".npz")):
        tensors, meta = read_weights(src)
        if meta.get("jaxdiff.format") == registry.FORMAT:
            raise WeightsError(f"{src} is already a converted jaxdiff file; load it directly")
        return tensors, {}
    if lower.endswith(TORCH_SUFFIXES):
        from jaxdiff.pretrained.torch_pickle import read_torch_file

        found = read_torch_file(src, entry=entry)
        return dict(found.tensors), dict(found.extra)
    raise WeightsError(
        f"{src}: unknown checkpoint type; expected one of {(*TORCH_SUFFIXES, '.safetensors')}"
    )


def smoke_test(pre: registry.Pretrained) -> None:
    """Runs the loaded network once on random input; raises if the output is not finite."""
    cfg = pre.config
    mod = registry.arch_module(cfg["arch"])
    if hasattr(mod, "smoke_test"):
        mod.smoke_test(pre)
        return
    x = jax.random.normal(jax.random.key(0), (1, *pre.sample_shape), jnp.float32)
    cond = jnp.zeros((1,), jnp.int32) if pre.num_classes else None
    out = pre.formulation.denoise(
        lambda *a: pre.model.apply({"params": pre.params}, *a), x, jnp.ones((1,)), cond
    )
    if not bool(jnp.all(jnp.isfinite(out))):
        raise WeightsError(f"{pre.path}: the converted network gives non-finite outputs")


def convert(
    src: str,
    dst: str,
    *,
    arch: str | None = None,
    entry: str | None = None,
    sha256: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    check: bool = True,
) -> Conversion:
    """Converts ``src`` to a jaxdiff weight file at ``dst``.

    Args:
      src: The original checkpoint (local path or bucket URL).
      dst: Output ``.safetensors`` path.
      arch: ``dit``, ``sit``, ``edm2`` or ``vae``; None detects it from the keys.
      entry: Which entry of a checkpoint dict to read (``"ema"``, ``"model"``).
      sha256: Expected SHA-256 of ``src``; a mismatch is an error.
      overrides: Config fields to set on the inferred config; also shown to the
        architecture's ``infer_config`` as hints (e.g. ``num_heads`` for a DiT whose width
        is not a published one).
      check: Read the result back and run it once.

    Returns:
      A :class:`Conversion` summary.

    Raises:
      WeightsError: For a hash mismatch, an unknown architecture or a key that does not fit.
    """
    if not storage.isfile(src):
        raise WeightsError(f"--src {src} does not exist")
    if not dst.endswith(".safetensors"):
        raise WeightsError(f"--dst must end in .safetensors, got {dst!r}")
    digest = file_sha256(src)
    if sha256 and digest != sha256.lower():
        raise WeightsError(
            f"{src}: SHA-256 {digest} differs from the expected {sha256.lower()}; the "
            "download is incomplete or a different file"
        )
    tensors, extra = read_checkpoint(src, entry)
    overrides = dict(overrides or {})
    config, params = registry.convert_state_dict(
        tensors, arch=arch, extra={**extra, **overrides}, source=src, **overrides
    )
    del tensors  # the original's arrays: free them before the copy is read back
    count = sum(int(np.prod(v.shape)) for v in registry.flatten_params(params).values())
    written = registry.save_converted(dst, config, params, source=src, source_sha256=digest)
    del params
    if check:
        smoke_test(registry.load_pretrained(dst))
    return Conversion(dst, config, count, digest, written, extra.get("entry"))


def _define_flags() -> dict[str, Any]:
    from absl import flags

    return {
        "src": flags.DEFINE_string("src", None, "Original checkpoint.", required=True),
        "dst": flags.DEFINE_string("dst", None, "Output .safetensors file.", required=True),
        "arch": flags.DEFINE_enum(
            "arch", None, sorted(registry.ARCH_MODULES), "Architecture (default: from keys)."
        ),
        "entry": flags.DEFINE_string("entry", None, "Checkpoint-dict entry (ema, model)."),
        "sha256": flags.DEFINE_string("sha256", None, "Expected SHA-256 of --src."),
        "check": flags.DEFINE_bool("check", True, "Reload the result and run it once."),
    }


def main(argv: Sequence[str], flag_values: dict[str, Any]) -> None:
    """Runs the command with parsed flags and prints a summary."""
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    v = {key: holder.value for key, holder in flag_values.items()}
    out = convert(
        v["src"], v["dst"], arch=v["arch"], entry=v["entry"], sha256=v["sha256"], check=v["check"]
    )
    cfg = out.config
    print(
        f"converted {os.path.basename(v['src'])} ({cfg['arch']}, {out.num_params:,} params"
        + (f", entry {out.entry!r}" if out.entry else "")
        + f") to {out.dst}"
    )
    print(f"source sha256 {out.source_sha256}")
    print(f"weights sha256 {out.sha256} (checked on every load)")


if __name__ == "__main__":
    from jaxdiff.utils import cli

    _FLAGS = _define_flags()
    cli.run(lambda argv: main(argv, _FLAGS))
