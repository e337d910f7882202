r"""Converts pytorch-fid's FID Inception weights (``.pth``) into jaxdiff's ``.npz``.

Run once, on any machine with PyTorch (torch is imported only here, lazily; it is not a
jaxdiff dependency)::

    # 1. the standard FID weights (TF's 2015-12-05 Inception, ported by pytorch-fid)
    curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    # 2. convert (checks the source's SHA-256 against the 6726825d in its published name;
    #    prints the output's SHA-256, also written to fid_inception.npz.sha256)
    pip install torch
    python -m jaxdiff.metrics.convert_inception \
        --pth=pt_inception-2015-12-05-6726825d.pth --out=fid_inception.npz
    # 3. point jaxdiff at it
    export JAXDIFF_INCEPTION_WEIGHTS=$PWD/fid_inception.npz

Add ``--fc-out=fid_inception_fc.npz`` to also write the 1008-way logits layer (Inception
Score; :mod:`jaxdiff.metrics.inception_heads`) to its own file (+ ``.sha256``).

Name mapping, torch state-dict key -> ``.npz`` key, where ``X`` is a module path such as
``Mixed_5b.branch5x5_1`` whose dots become slashes:

* ``X.conv.weight`` ``[O, I, kh, kw]`` -> ``params/X/conv/kernel`` ``[kh, kw, I, O]``;
* ``X.bn.weight`` -> ``params/X/bn/scale``; ``X.bn.bias`` -> ``params/X/bn/bias``;
* ``X.bn.running_mean`` -> ``batch_stats/X/bn/mean``;
  ``X.bn.running_var`` -> ``batch_stats/X/bn/var``;
* ``X.bn.num_batches_tracked``, ``fc.*`` (the 1008-way logits) and ``AuxLogits.*`` are
  dropped from the pool3 file: pool3 does not use them;
* ``fc.weight`` ``[1008, 2048]`` -> ``kernel`` ``[2048, 1008]`` and ``fc.bias`` -> ``bias``
  of the separate logits file (:func:`convert_fc`).

Every expected variable must be present with the right shape, or the converter stops.
The output is byte-deterministic, so the same ``.pth`` always yields the same SHA-256.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdiff.metrics.inception_heads import save_inception_fc
from jaxdiff.metrics.inception_weights import (
    PTH_FILENAME,
    PTH_SHA256_PREFIX,
    save_inception_variables,
)
from jaxdiff.metrics.weights import ChecksumMismatchError, file_sha256
from jaxdiff.utils import storage
from jaxdiff.utils.trees import unflatten_tree

_IGNORED_PREFIXES = ("fc.", "AuxLogits.")
_BN_NAMES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Maps a pytorch-fid Inception state dict to jaxdiff Inception variables.

    Args:
      state_dict: Torch key -> array (torch tensors or numpy arrays).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays.

    Raises:
      ValueError: On a key this mapping does not know.
    """
    flat: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key.startswith(_IGNORED_PREFIXES) or key.endswith("num_batches_tracked"):
            continue
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        arr = arr.astype(np.float32)
        *module, layer, leaf = key.split(".")
        path = "/".join(module)
        if layer == "conv" and leaf == "weight":
            flat[f"params/{path}/conv/kernel"] = np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
        elif layer == "bn" and leaf in _BN_NAMES:
            collection, name = _BN_NAMES[leaf]
            flat[f"{collection}/{path}/bn/{name}"] = arr
        else:
            raise ValueError(f"unexpected key {key!r} in the Inception state dict")
    return unflatten_tree(flat)


def convert_fc(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Extracts the 1008-way logits layer (``fc.weight``, ``fc.bias``) of the state dict.

    Args:
      state_dict: Torch key -> array (torch tensors or numpy arrays).

    Returns:
      ``{"kernel": [2048, 1008], "bias": [1008]}`` float32 numpy arrays.

    Raises:
      ValueError: If ``fc.weight`` or ``fc.bias`` is missing.
    """
    missing = [k for k in ("fc.weight", "fc.bias") if k not in state_dict]
    if missing:
        raise ValueError(
            f"the Inception state dict has no {missing}: use pytorch-fid's {PTH_FILENAME}, "
            "which includes the logits layer"
        )

    def arr(key: str) -> np.ndarray:
        value = state_dict[key]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else value
        return np.asarray(value, np.float32)

    return {"kernel": np.ascontiguousarray(arr("fc.weight").T), "bias": arr("fc.bias")}


def check_source(pth: str) -> str:
    """The source's SHA-256, checked against the published file's prefix ``6726825d``.

    Raises:
      ChecksumMismatchError: If it does not start with :data:`PTH_SHA256_PREFIX`, naming
        the file, both hashes and the fix.
    """
    digest = file_sha256(pth)
    if not digest.startswith(PTH_SHA256_PREFIX):
        raise ChecksumMismatchError(
            f"{pth!r} has SHA-256 {digest}, but pytorch-fid's published {PTH_FILENAME} "
            f"starts with {PTH_SHA256_PREFIX}: it is corrupt, truncated or another network. "
            "Download it again; to convert other weights on purpose, pass --any-source."
        )
    return digest


def convert(pth: str, out: str, fc_out: str | None = None, *, any_source: bool = False) -> str:
    """Reads the ``.pth`` with torch, converts it and writes ``out`` (+ ``out.sha256``).

    Args:
      pth: Path of ``pt_inception-2015-12-05-6726825d.pth`` (local or a bucket URL).
      out: Output ``.npz`` path (local or a bucket URL).
      fc_out: If given, also write the logits layer there (+ ``.sha256``).
      any_source: Skip :func:`check_source` (other weights of the same architecture, e.g.
        random ones for a test).

    Returns:
      The SHA-256 of the pool3 weights file.

    Raises:
      ImportError: If torch is not installed (with the install command).
      ChecksumMismatchError: If the source is not the published file (see
        :func:`check_source`).
    """
    if not any_source:
        check_source(pth)
    try:
        import torch  # noqa: PLC0415 - optional, converter-only dependency
    except ImportError as err:
        raise ImportError(
            "the converter needs PyTorch to read the .pth: `pip install torch` "
            "(CPU build is enough); jaxdiff itself does not need it"
        ) from err
    data = io.BytesIO(storage.read_bytes(pth))  # through storage, so gs:// works too
    state_dict = torch.load(data, map_location="cpu", weights_only=True)
    if fc_out is not None:
        save_inception_fc(fc_out, convert_fc(state_dict))
    return save_inception_variables(out, convert_state_dict(state_dict))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pth", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--fc-out", default=None, help="also write the logits layer here")
    parser.add_argument(
        "--any-source",
        action="store_true",
        help=f"convert a .pth whose SHA-256 does not start with {PTH_SHA256_PREFIX}",
    )
    args = parser.parse_args(argv)
    print(f"source {args.pth}: SHA-256 {file_sha256(args.pth)}")
    digest = convert(args.pth, args.out, args.fc_out, any_source=args.any_source)
    if args.fc_out is not None:
        fc_out = storage.to_str(args.fc_out)
        print(f"wrote {fc_out}, SHA-256 {file_sha256(fc_out)} (also in {fc_out}.sha256)")
    out = storage.to_str(args.out)  # absolute for a local file; a bucket URL as given
    print(f"wrote {out}, SHA-256 {digest} (also in {out}.sha256)")
    print(f"use it with: export JAXDIFF_INCEPTION_WEIGHTS={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
