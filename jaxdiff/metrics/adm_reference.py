"""Reference batches in ADM's ``.npz`` layout, made from any data source.

:func:`make_adm_reference` reads the first ``num`` images of a source, stores them as
uint8 (``arr_0``, as ADM's published batches hold 10 000 of them) with their labels
(``arr_1``), and adds the pool3 and spatial statistics (``mu``/``sigma``,
``mu_s``/``sigma_s``) computed from those same uint8 images in one streamed, sharded
Inception pass. The file then serves every metric of the Inception table
(:func:`jaxdiff.metrics.inception_evaluator` ``ref_batch=``, ``python -m sample
--ref_batch=``) and ADM's own ``evaluator.py``. Command:
``python -m jaxdiff.metrics.reference_stats --evaluator=adm --num=10000``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jaxdiff.metrics.adm_batches import save_adm_reference
from jaxdiff.metrics.evaluator import Evaluator
from jaxdiff.metrics.inception import load_inception_variables
from jaxdiff.metrics.inception_eval import INCEPTION_FEATURE, inception_feature_fn
from jaxdiff.metrics.streaming import read_batch, reference_statistics
from jaxdiff.parallel import is_main_process

ADM_REFERENCE_SIZE = 10_000
"""Images in ADM's published reference batches (and the command's default)."""


def to_uint8_rgb(images: Any) -> np.ndarray:
    """``[N, H, W, 1 or 3]`` images in [-1, 1] (or already uint8) as uint8 RGB.

    Floats map by ``round((x + 1) * 127.5)`` clipped to [0, 255], the inverse of the data
    sources' ``u / 127.5 - 1``, so an image read from a PNG returns to its exact bytes.

    Raises:
      ValueError: For another shape, naming it.
    """
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must be [N, H, W, 1 or 3], got shape {x.shape}: decode latents to images first"
        )
    if x.dtype != np.uint8:
        x = np.clip(np.rint((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _read_images(source: Any, num: int, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    images, labels = [], []
    for start in range(0, num, batch_size):
        batch = read_batch(source, np.arange(start, min(start + batch_size, num)))
        images.append(to_uint8_rgb(batch["image"]))
        if "label" in batch:
            labels.append(np.asarray(batch["label"]).reshape(-1))
    return np.concatenate(images), (np.concatenate(labels) if labels else None)


def make_adm_reference(
    source: Any,
    path: str | os.PathLike,
    *,
    num: int | None = None,
    inception_weights: str | os.PathLike | None = None,
    mesh: Mesh | None = None,
    batch_size: int = 250,
    progress: bool = True,
) -> str:
    """Writes an ADM-layout reference batch of ``source``'s first ``num`` images.

    Args:
      source: A data source (``len`` and ``get_batch`` or ``[i]`` giving ``{"image",
        "label"?}``), e.g. from :func:`jaxdiff.data.get_dataset`, or an ``[N, H, W, C]``
        array (floats in [-1, 1] or uint8).
      path: Output ``.npz``, local or a bucket URL.
      num: Images to keep (default ``min(10 000, len(source))``, as ADM's batches).
      inception_weights: Converted Inception weights (default
        ``$JAXDIFF_INCEPTION_WEIGHTS``).
      mesh: Device mesh for the Inception pass (default all devices).
      batch_size: Global images per Inception call (and per read).
      progress: Show a progress bar (process 0, on a terminal).

    Returns:
      The SHA-256 of the file on process 0, which writes it; ``""`` on the others.

    Raises:
      ValueError: For ``num`` outside ``[2, len(source)]`` or images that are not
        ``[H, W, 1 or 3]``.
    """
    total = len(source)
    num = min(ADM_REFERENCE_SIZE, total) if num is None else int(num)
    if not 2 <= num <= total:
        raise ValueError(f"num={num} must be in [2, {total}] (the source's size)")
    if isinstance(source, np.ndarray):
        images, labels = to_uint8_rgb(source[:num]), None
    else:
        images, labels = _read_images(source, num, batch_size)
    variables = load_inception_variables(inception_weights)
    fn = inception_feature_fn("uint8", False, spatial=True)
    ev = Evaluator("adm", (variables, None), fn, _no_reduce, batch_size, INCEPTION_FEATURE)
    stats = reference_statistics(
        images, ev, batch_size=batch_size, mesh=mesh, progress=progress, key=("features", "spatial")
    )
    pool, spatial = stats["features"], stats["spatial"]
    if not is_main_process():
        return ""
    return save_adm_reference(
        path,
        images,
        labels=labels,
        mu=pool.mu,
        sigma=pool.sigma,
        mu_s=spatial.mu,
        sigma_s=spatial.sigma,
    )


def _no_reduce(features: Any, labels: Any) -> dict[str, float]:
    raise ValueError("this evaluator only computes reference features")


__all__ = ["ADM_REFERENCE_SIZE", "make_adm_reference", "to_uint8_rgb"]
