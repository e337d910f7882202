"""FID Inception outputs beyond pool3: ADM's sFID features, the 1008-way logits and IS.

What ADM's evaluator (``openai/guided-diffusion`` ``evaluations/evaluator.py``) reads from
TensorFlow's 2015-12-05 Inception graph, on the same network as FID:

* ``pool_3:0``: the 2048-d pool3 features (FID, precision/recall);
* ``mixed_6/conv:0[..., :7]``, flattened: the spatial features of sFID. ``mixed_6`` is
  pytorch-fid's ``Mixed_6d`` and its ``conv`` is the ``branch1x1`` conv (after BN and
  ReLU), which is the first 192 channels of the block's output: ``[B, 17 * 17 * 7]`` =
  ``[B, 2023]`` at 299 px, flattened in NHWC order as ADM does;
* the Inception Score's softmax of ``pool3 @ W`` over all 1008 classes, with ``W`` the
  graph's ``softmax/logits`` matrix and *no bias* (as improved-GAN's ``inception_score``;
  torch-fidelity calls this ``logits_unbiased``). pytorch-fid's state dict holds the same
  layer as ``fc.weight`` ``[1008, 2048]`` / ``fc.bias``; pytorch-fid itself never uses it.

The fc layer is stored apart from the pool3 weights (``fid_inception_fc.npz``, written by
``python -m jaxdiff.metrics.convert_inception --fc-out=...``) so existing pool3 weight
files stay valid. Parity with pytorch-fid 0.3.0 is tested on seeded random weights by
``tests/test_metrics_inception_parity.py``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.metrics.inception import (
    FEATURE_DIM,
    INPUT_SIZE,
    InceptionV3,
    preprocess,
)
from jaxdiff.metrics.weights import ChecksumMismatchError, load_arrays, save_arrays
from jaxdiff.utils import storage

NUM_CLASSES = 1008
"""Classes of the FID Inception's logits layer (ImageNet's 1000 plus 8 unused)."""

FC_SHAPES = {"kernel": (FEATURE_DIM, NUM_CLASSES), "bias": (NUM_CLASSES,)}
"""Shapes of the converted logits layer: ``kernel`` is ``fc.weight`` transposed."""

_DEFAULT = object()


def inception_logits(pool3: jax.Array, fc: Any, *, bias: bool = True) -> jax.Array:
    """Applies the 1008-way logits layer to pool3 features.

    Args:
      pool3: ``[B, 2048]`` features.
      fc: ``{"kernel": [2048, 1008], "bias": [1008]}`` (see :func:`load_inception_fc`).
      bias: Add the bias (torch-fidelity's ``logits``); False gives the unbiased logits
        that ADM and improved-GAN feed to the Inception Score's softmax.

    Returns:
      ``[B, 1008]`` float32 logits.
    """
    # Full float32 products: the logits feed a softmax that IS compares across tools.
    out = jnp.dot(
        jnp.asarray(pool3, jnp.float32),
        jnp.asarray(fc["kernel"], jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return out + jnp.asarray(fc["bias"], jnp.float32) if bias else out


def inception_outputs(
    variables: Any,
    images: jax.Array,
    *,
    fc: Any | None = None,
    input_range: str = "minus_one_one",
    quantize: bool = True,
    size: int = INPUT_SIZE,
) -> dict[str, jax.Array]:
    """Pool3, sFID spatial features and (with ``fc``) logits of raw images in one pass.

    Pure and jittable. For reference-comparable numbers on GPU/TPU run it under
    ``jax.default_matmul_precision("highest")`` (float32 convs; TF32/bf16 passes move the
    features by ~1e-3).

    Args:
      variables: Pool3 network variables (see
        :func:`jaxdiff.metrics.inception.load_inception_variables`).
      images: ``[B, H, W, C]`` images, see :func:`jaxdiff.metrics.inception.preprocess`.
      fc: Logits layer from :func:`load_inception_fc`, or None to skip the logits.
      input_range: See :func:`jaxdiff.metrics.inception.preprocess`.
      quantize: See :func:`jaxdiff.metrics.inception.preprocess`.
      size: See :func:`jaxdiff.metrics.inception.preprocess`.

    Returns:
      ``{"pool3": [B, 2048], "spatial": [B, h * w * 7]}`` (``[B, 2023]`` at 299 px), plus
      ``"logits"`` and ``"logits_unbiased"`` ``[B, 1008]`` when ``fc`` is given; float32.
    """
    x = preprocess(images, input_range=input_range, quantize=quantize, size=size)
    pool3, spatial = InceptionV3().apply(variables, x, return_spatial=True)
    out = {"pool3": pool3, "spatial": spatial.reshape(spatial.shape[0], -1)}
    if fc is not None:
        out["logits_unbiased"] = inception_logits(pool3, fc, bias=False)
        out["logits"] = out["logits_unbiased"] + jnp.asarray(fc["bias"], jnp.float32)
    return out


def _check_fc(fc: Any, path: Any) -> None:
    bad = {
        k: tuple(np.shape(fc[k])) if k in fc else None
        for k in FC_SHAPES
        if k not in fc or tuple(np.shape(fc[k])) != FC_SHAPES[k]
    }
    extra = sorted(set(fc) - set(FC_SHAPES))
    if bad or extra:
        raise ValueError(
            f"{os.fspath(path)!r} is not a converted FID Inception logits layer "
            f"(want {FC_SHAPES}; wrong or missing: {bad}; unexpected: {extra}); re-create it "
            "with `python -m jaxdiff.metrics.convert_inception --fc-out=...`"
        )


def save_inception_fc(path: str | os.PathLike, fc: Any) -> str:
    """Writes the logits layer to a deterministic ``.npz`` plus ``<path>.sha256``.

    Args:
      path: Output file (local or a bucket URL).
      fc: ``{"kernel": [2048, 1008], "bias": [1008]}``.

    Returns:
      The file's SHA-256.

    Raises:
      ValueError: On missing, extra or wrongly shaped arrays.
    """
    _check_fc(fc, path)
    digest = save_arrays(path, {k: np.asarray(fc[k], np.float32) for k in FC_SHAPES})
    storage.write_text(
        f"{storage.to_str(path)}.sha256", f"{digest}  {storage.as_path(path).name}\n"
    )
    return digest


def load_inception_fc(
    path: str | os.PathLike, *, expected_sha256: Any = _DEFAULT
) -> dict[str, np.ndarray]:
    """Loads the logits layer written by ``convert_inception --fc-out``.

    Args:
      path: The ``.npz`` (local or a bucket URL).
      expected_sha256: Hex digest the file must have; default: the one in
        ``<path>.sha256`` when that file exists; None skips the check.

    Returns:
      ``{"kernel": [2048, 1008], "bias": [1008]}`` float32 numpy arrays.

    Raises:
      FileNotFoundError: If the file does not exist (the message says how to make it).
      ChecksumMismatchError: On a digest mismatch or an empty ``.sha256`` file.
      ValueError: On missing, extra or wrongly shaped arrays.
    """
    path = storage.to_str(path)
    if not storage.isfile(path):
        raise FileNotFoundError(
            f"Inception logits file {path!r} does not exist: make it with `python -m "
            "jaxdiff.metrics.convert_inception --pth=... --out=... --fc-out=...`"
        )
    if expected_sha256 is _DEFAULT:
        expected_sha256 = None
        if storage.isfile(f"{path}.sha256"):
            words = storage.read_text(f"{path}.sha256").split()
            if not words:
                raise ChecksumMismatchError(f"checksum file {path + '.sha256'!r} is empty")
            expected_sha256 = words[0]
    fc = load_arrays(path, expected_sha256=expected_sha256, what="Inception logits file")
    _check_fc(fc, path)
    return {k: v.astype(np.float32) for k, v in fc.items()}


__all__ = [
    "FC_SHAPES",
    "NUM_CLASSES",
    "inception_logits",
    "inception_outputs",
    "load_inception_fc",
    "save_inception_fc",
]
