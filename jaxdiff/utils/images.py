"""Image grids for looking at samples: tile, upscale, save as PNG.

Images follow the library's data convention: float ``[N, H, W, C]`` in ``[-1, 1]`` with
``C`` = 1 (grey) or 3 (RGB). Grids come out as ``uint8`` RGB, ready for Pillow.

Samples with another channel count -- typically 4-channel VAE latents -- are made
displayable by :func:`displayable`: a ``decode`` callable (latents -> images in [-1, 1],
e.g. a VAE decoder) is applied when given; without one the first channels are shown as a
false-colour preview and a note says so (see :func:`displayable`).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable

import numpy as np

from jaxdiff.utils import storage

#: ``latents [N, H, W, C] -> images [N, H', W', 1 or 3]`` in ``[-1, 1]``, e.g. a VAE decoder.
Decoder = Callable[[np.ndarray], np.ndarray]


def _to_uint8(images: np.ndarray) -> np.ndarray:
    # NaN would cast to an arbitrary byte; map it to mid-grey so it is visible but harmless.
    x = np.nan_to_num(np.asarray(images, np.float32), nan=0.0)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _as_nhwc(images: np.ndarray, what: str = "images") -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] < 1:
        raise ValueError(
            f"{what} must be [N, H, W, C] with C >= 1 or [N, H, W], got shape {images.shape}"
        )
    return images


def _rescale_channels(x: np.ndarray) -> np.ndarray:
    """Maps each channel's finite batch-wide range onto ``[-1, 1]`` (constant -> 0)."""
    x = np.asarray(x, np.float32)
    out = np.zeros_like(x)
    for c in range(x.shape[-1]):
        channel = x[..., c]
        finite = channel[np.isfinite(channel)]
        if finite.size and finite.max() > finite.min():
            lo, hi = finite.min(), finite.max()
            out[..., c] = (channel - lo) * (2.0 / (hi - lo)) - 1.0
    return out


def displayable(images: np.ndarray, decode: Decoder | None = None) -> tuple[np.ndarray, str | None]:
    """Turns samples with any channel count into 1- or 3-channel images for a grid.

    * ``C`` in (1, 3): returned unchanged.
    * Other ``C`` with ``decode``: ``decode(images)`` (e.g. a VAE decoder), which must
      return ``[N, H', W', 1 or 3]`` images in ``[-1, 1]``.
    * Other ``C`` without ``decode``: a preview of the raw channels -- channels 0-2 as RGB
      (``C == 2``: channel 0 as grey). Latents are not in ``[-1, 1]``, so each shown
      channel is rescaled to ``[-1, 1]`` by its min and max over the batch; clipping them
      instead would saturate most pixels.

    Args:
        images: float ``[N, H, W, C]`` (``C >= 1``) or ``[N, H, W]``.
        decode: Optional ``Decoder`` applied to samples that are not 1- or 3-channel.

    Returns:
        ``(images, note)``: images ``[N, H, W, 1 or 3]``, and a note naming the channel
        count when raw channels are previewed for lack of a decoder (``None`` otherwise),
        for the caller to log.

    Raises:
        ValueError: for a wrong rank, ``C == 0``, or a decoder output that is not
            ``[N, H, W, 1 or 3]``.

    Example:
        >>> shown, note = displayable(np.zeros((2, 8, 8, 4)))
        >>> shown.shape, note.split(";")[0]
        ((2, 8, 8, 3), '4-channel samples: no decoder configured')
    """
    images = _as_nhwc(images)
    channels = images.shape[-1]
    if channels in (1, 3):
        return images, None
    if decode is not None:
        decoded = np.asarray(decode(images))
        if decoded.ndim != 4 or decoded.shape[-1] not in (1, 3) or len(decoded) != len(images):
            raise ValueError(
                f"decode turned {channels}-channel samples {images.shape} into shape "
                f"{decoded.shape}; it must return [{len(images)}, H, W, 1 or 3] images in "
                "[-1, 1]"
            )
        return decoded, None
    if channels == 2:
        shown, which = images[..., :1], "channel 0 as grey"
    else:
        shown, which = images[..., :3], "channels 0-2"
    note = (
        f"{channels}-channel samples: no decoder configured; showing {which}, each rescaled "
        "to [-1, 1] over the batch"
    )
    return _rescale_channels(shown), note


def make_grid(
    images: np.ndarray,
    nrow: int | None = None,
    padding: int = 1,
    pad_value: float = 1.0,
    decode: Decoder | None = None,
) -> np.ndarray:
    """Tiles a batch of images into one RGB grid.

    Args:
        images: float ``[N, H, W, C]`` or ``[N, H, W]`` in ``[-1, 1]``; values outside are
            clipped. ``C`` in {1, 3} is shown as grey/RGB; any other ``C`` goes through
            :func:`displayable` (``decode``, or a preview of the raw channels, announced
            with a ``UserWarning`` naming the channel count).
        nrow: images per row; default ``ceil(sqrt(N))``, a near-square grid.
        padding: pixels between images and around the border.
        pad_value: padding colour on the same ``[-1, 1]`` scale (1.0 is white).
        decode: optional latents-to-images ``Decoder`` for samples that are not 1- or
            3-channel, e.g. a VAE decoder.

    Returns:
        ``uint8`` array ``[rows * (H + padding) + padding, nrow * (W + padding) + padding,
        3]`` with ``rows = ceil(N / nrow)``; ``-1`` maps to 0 and ``1`` to 255.

    Raises:
        ValueError: for a wrong rank, no channels, empty batch, or bad ``nrow``/``padding``.

    Example:
        >>> make_grid(np.zeros((10, 8, 8, 1)), nrow=4).shape
        (28, 37, 3)
    """
    images = _as_nhwc(images)
    if len(images) == 0:
        raise ValueError("images is empty (N = 0): nothing to put in a grid")
    if nrow is not None and nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    images, note = displayable(images, decode)
    if note is not None:
        # A warning, not a log line: shown once per message by default, so a grid written
        # every few thousand steps does not repeat it, and tests can catch it.
        warnings.warn(note, UserWarning, stacklevel=2)
    n, h, w, _ = images.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
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
    decode: Decoder | None = None,
) -> str:
    """Writes :func:`make_grid` of ``images``, upscaled by ``scale``, as a PNG.

    The file is written atomically through :mod:`jaxdiff.utils.storage`, so ``path`` may
    be local or a bucket URL (``gs://bucket/run/samples/grid.png``).

    Args:
        path: output file; parent directories are created.
        images: float ``[N, H, W, C]`` in ``[-1, 1]``, any ``C >= 1``, as for
            :func:`make_grid`.
        nrow: images per row (default near-square).
        scale: nearest-neighbour upscaling factor applied to the whole grid.
        padding: pixels between images, before scaling.
        decode: optional latents-to-images ``Decoder`` for samples that are not 1- or
            3-channel (see :func:`displayable`).

    Returns:
        The path written, as a string.

    Raises:
        ValueError: as :func:`make_grid` and :func:`upscale`.
    """
    from PIL import Image  # Imported here: Pillow is only needed when writing files.

    grid = upscale(make_grid(images, nrow=nrow, padding=padding, decode=decode), scale)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())
    return os.fspath(path)
