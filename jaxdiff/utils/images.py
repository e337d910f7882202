"""Image grids for looking at samples: tile, upscale, save as PNG.

Images follow the library's data convention: float ``[N, H, W, C]`` in ``[-1, 1]`` with
``C`` = 1 (grey) or 3 (RGB). Grids come out as ``uint8`` RGB, ready for Pillow.
"""

from __future__ import annotations

import math
import os

import numpy as np


def _to_uint8(images: np.ndarray) -> np.ndarray:
    # NaN would cast to an arbitrary byte; map it to mid-grey so it is visible but harmless.
    x = np.nan_to_num(np.asarray(images, np.float32), nan=0.0)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def make_grid(
    images: np.ndarray, nrow: int | None = None, padding: int = 1, pad_value: float = 1.0
) -> np.ndarray:
    """Tiles a batch of images into one RGB grid.

    Args:
        images: float ``[N, H, W, C]`` (``C`` in {1, 3}) or ``[N, H, W]`` in ``[-1, 1]``;
            values outside are clipped.
        nrow: images per row; default ``ceil(sqrt(N))``, a near-square grid.
        padding: pixels between images and around the border.
        pad_value: padding colour on the same ``[-1, 1]`` scale (1.0 is white).

    Returns:
        ``uint8`` array ``[rows * (H + padding) + padding, nrow * (W + padding) + padding,
        3]`` with ``rows = ceil(N / nrow)``; ``-1`` maps to 0 and ``1`` to 255.

    Raises:
        ValueError: for a wrong rank, channel count, empty batch, or bad ``nrow``/``padding``.

    Example:
        >>> make_grid(np.zeros((10, 8, 8, 1)), nrow=4).shape
        (28, 37, 3)
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must be [N, H, W, C] with C in (1, 3) or [N, H, W], got shape {images.shape}"
        )
    n, h, w, _ = images.shape
    if n == 0:
        raise ValueError("images is empty (N = 0): nothing to put in a grid")
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    ncol, rows = min(nrow, n), math.ceil(n / nrow)
    tiles = _to_uint8(images)
    if tiles.shape[-1] == 1:
        tiles = np.repeat(tiles, 3, axis=-1)
    fill = _to_uint8(np.float32(pad_value))
    grid = np.full(
        (rows * (h + padding) + padding, ncol * (w + padding) + padding, 3), fill, np.uint8
    )
    for i in range(n):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[top : top + h, left : left + w] = tiles[i]
    return grid


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling, so tiny images (8x8 digits) stay crisp when viewed.

    Args:
        img: ``[H, W]`` or ``[H, W, C]`` array of any dtype.
        factor: integer scale, ``>= 1``.

    Returns:
        ``[H * factor, W * factor(, C)]`` array of the same dtype.

    Raises:
        ValueError: if ``factor`` is not a positive integer or ``img`` is not 2-D/3-D.
    """
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"img must be [H, W] or [H, W, C], got shape {img.shape}")
    factor = int(factor)
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def save_image_grid(
    path: str | os.PathLike,
    images: np.ndarray,
    nrow: int | None = None,
    scale: int = 1,
    padding: int = 1,
) -> str:
    """Writes :func:`make_grid` of ``images``, upscaled by ``scale``, as a PNG.

    Args:
        path: output file; parent directories are created.
        images: float ``[N, H, W, C]`` in ``[-1, 1]``, as for :func:`make_grid`.
        nrow: images per row (default near-square).
        scale: nearest-neighbour upscaling factor applied to the whole grid.
        padding: pixels between images, before scaling.

    Returns:
        The path written, as a string.

    Raises:
        ValueError: as :func:`make_grid` and :func:`upscale`.
    """
    from PIL import Image  # Imported here: Pillow is only needed when writing files.

    grid = upscale(make_grid(images, nrow=nrow, padding=padding), scale)
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG")
    return path
