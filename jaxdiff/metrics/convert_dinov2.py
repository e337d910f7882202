r"""Converts a published DINOv2 backbone (``.pth``) into jaxdiff's ``.safetensors``, torch-free.

    curl -LO https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth
    python -m jaxdiff.metrics.convert_dinov2 \
        --src dinov2_vitl14_pretrain.pth --dst dinov2_vitl14.safetensors

The ``.pth`` (a bare ``torch.save`` state dict) is read by jaxdiff's restricted unpickler
(:func:`jaxdiff.pretrained.torch_pickle.read_torch_file`); torch is not needed. The
architecture is recognised from the width and depth (``--arch`` names it instead).

Name mapping, torch key -> jaxdiff param (``i`` the block index):

* ``cls_token``, ``pos_embed`` -> same names; ``mask_token`` is dropped (masking is a
  training feature; features never use it);
* ``patch_embed.proj.weight`` ``[D, 3, 14, 14]`` -> ``patch_embed/kernel`` ``[14, 14, 3, D]``;
* ``blocks.i.attn.{qkv,proj}``, ``blocks.i.mlp.{fc1,fc2}`` (Linear ``[out, in]``) ->
  ``blocks_i/{qkv,proj,fc1,fc2}/kernel`` ``[in, out]`` and ``.../bias``;
* ``blocks.i.{norm1,norm2}``, ``norm`` (LayerNorm ``weight``/``bias``) -> ``.../scale``,
  ``.../bias``; ``blocks.i.ls{1,2}.gamma`` -> ``blocks_i/ls{1,2}``.

A key this mapping does not use, a missing key or a mis-shaped one stops the conversion
with a :class:`~jaxdiff.pretrained.weights_io.WeightsError` naming the file and key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxdiff.metrics.dinov2 import FORMAT, PRESETS, DINOv2Config, load_dinov2_params
from jaxdiff.pretrained.torch_pickle import read_torch_file
from jaxdiff.pretrained.weights_io import (
    StateDict,
    WeightsError,
    file_sha256,
    read_weights,
    write_weights,
)

_BLOCK = re.compile(r"blocks\.(\d+)\.norm1\.weight")


def infer_config(state_dict: Mapping[str, Any], source: str = "<memory>") -> DINOv2Config:
    """The preset whose width and depth match the state dict.

    Raises:
      WeightsError: For register-token or SwiGLU (ViT-g) variants, chunked block keys, or
        a width/depth of no preset.
    """
    if "register_tokens" in state_dict:
        raise WeightsError(f"{source}: a register-token (``_reg``) DINOv2; not supported")
    if any(".mlp.w12." in k for k in state_dict):
        raise WeightsError(f"{source}: a SwiGLU DINOv2 (ViT-g/14); not supported")
    if "cls_token" not in state_dict:
        raise WeightsError(f"{source}: no 'cls_token' key; not a DINOv2 backbone state dict")
    dim = int(np.shape(state_dict["cls_token"])[-1])
    depth = sum(1 for k in state_dict if _BLOCK.fullmatch(k))
    for cfg in PRESETS.values():
        if (cfg.embed_dim, cfg.depth) == (dim, depth):
            return cfg
    known = {n: (c.embed_dim, c.depth) for n, c in PRESETS.items()}
    raise WeightsError(
        f"{source}: width {dim}, depth {depth} (blocks.<i>.* keys) match no preset {known}; "
        "pass the architecture explicitly"
    )


def convert_state_dict(
    state_dict: Mapping[str, Any], config: DINOv2Config, source: str = "<memory>"
) -> dict[str, np.ndarray]:
    """Maps a DINOv2 state dict onto flat jaxdiff params (``{"blocks_0/qkv/kernel": ...}``).

    Args:
      state_dict: Torch key -> array.
      config: The architecture the weights must have.
      source: Name used in errors (the file).

    Returns:
      Flat float32 params (contiguous numpy arrays).

    Raises:
      WeightsError: For a missing, mis-shaped or unused key.
    """
    sd = StateDict(state_dict, source=source)
    d, p, hidden = config.embed_dim, config.patch_size, int(config.embed_dim * config.mlp_ratio)
    out = {
        "cls_token": sd.take("cls_token", (1, 1, d)),
        "pos_embed": sd.take("pos_embed", (1, config.grid**2 + 1, d)),
        "patch_embed/kernel": sd.take("patch_embed.proj.weight", (d, 3, p, p)).transpose(
            2, 3, 1, 0
        ),
        "patch_embed/bias": sd.take("patch_embed.proj.bias", (d,)),
    }
    if sd.has("mask_token"):
        sd.take("mask_token", (1, d))  # checked, then dropped: features never mask

    def linear(src: str, dst: str, fan_in: int, fan_out: int) -> None:
        out[f"{dst}/kernel"] = sd.take(f"{src}.weight", (fan_out, fan_in)).T
        out[f"{dst}/bias"] = sd.take(f"{src}.bias", (fan_out,))

    def norm(src: str, dst: str) -> None:
        out[f"{dst}/scale"] = sd.take(f"{src}.weight", (d,))
        out[f"{dst}/bias"] = sd.take(f"{src}.bias", (d,))

    for i in range(config.depth):
        t, j = f"blocks.{i}", f"blocks_{i}"
        norm(f"{t}.norm1", f"{j}/norm1")
        linear(f"{t}.attn.qkv", f"{j}/qkv", d, 3 * d)
        linear(f"{t}.attn.proj", f"{j}/proj", d, d)
        out[f"{j}/ls1"] = sd.take(f"{t}.ls1.gamma", (d,))
        norm(f"{t}.norm2", f"{j}/norm2")
        linear(f"{t}.mlp.fc1", f"{j}/fc1", d, hidden)
        linear(f"{t}.mlp.fc2", f"{j}/fc2", hidden, d)
        out[f"{j}/ls2"] = sd.take(f"{t}.ls2.gamma", (d,))
    norm("norm", "norm")
    sd.finish()
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def read_state_dict(src: str) -> dict[str, np.ndarray]:
    """Reads ``src``: ``.pth``/``.pt`` by the torch-free reader, else safetensors/npz."""
    if src.lower().endswith((".safetensors", ".npz")):
        return dict(read_weights(src)[0])
    return dict(read_torch_file(src).tensors)


def convert(
    src: str, dst: str, config: DINOv2Config | str | None = None
) -> tuple[DINOv2Config, int, str]:
    """Converts ``src`` into ``dst``, then reads ``dst`` back through the loader.

    Args:
      src: The published ``.pth`` (local path or bucket URL).
      dst: Output ``.safetensors``.
      config: A :class:`DINOv2Config`, a preset name, or None to recognise it.

    Returns:
      ``(config, number of parameters, SHA-256 of the written data)``.

    Raises:
      WeightsError: If ``src`` is unreadable or not a matching DINOv2 state dict.
    """
    state_dict = read_state_dict(src)
    if config is None:
        config = infer_config(state_dict, src)
    elif isinstance(config, str):
        if config not in PRESETS:
            raise WeightsError(f"unknown --arch {config!r}; choose one of {sorted(PRESETS)}")
        config = PRESETS[config]
    flat = convert_state_dict(state_dict, config, src)
    meta = {
        "jaxdiff.format": FORMAT,
        "jaxdiff.config": json.dumps(dataclasses.asdict(config), sort_keys=True),
        "jaxdiff.source_sha256": file_sha256(src),
    }
    digest = write_weights(dst, flat, meta)
    load_dinov2_params(dst)  # the written file must load as it will be used
    return config, int(sum(v.size for v in flat.values())), digest


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="dinov2_vit*14_pretrain.pth")
    parser.add_argument("--dst", required=True, help="output .safetensors")
    parser.add_argument("--arch", choices=sorted(PRESETS), help="default: from the weights")
    args = parser.parse_args(argv)
    try:
        config, count, digest = convert(args.src, args.dst, args.arch)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: {config}, {count:,} parameters, data SHA-256 {digest}")
    return 0


__all__ = ["convert", "convert_state_dict", "infer_config", "main", "read_state_dict"]

if __name__ == "__main__":
    sys.exit(main())
