"""Rendering 2-D point clouds as images, so toy runs get a "sample grid" too."""

from __future__ import annotations

import numpy as np


def render_points(
    points: np.ndarray, *, size: int = 128, extent: float = 4.0, gamma: float = 0.5
) -> np.ndarray:
    """Renders ``[N, 2]`` points as a ``[size, size, 1]`` density image in [-1, 1].

    Args:
        points: the samples.
        size: image side in pixels.
        extent: the square ``[-extent, extent]^2`` is shown.
        gamma: brightness curve (< 1 shows sparse regions).

    Returns:
        float32 image, dark background (-1) and bright dense regions (up to 1).
    """
    points = np.asarray(points, np.float64).reshape(-1, 2)
    hist, _, _ = np.histogram2d(
        points[:, 1], points[:, 0], bins=size, range=[[-extent, extent], [-extent, extent]]
    )
    hist = hist[::-1]  # y grows upwards in the picture
    density = (hist / max(hist.max(), 1.0)) ** gamma
    return (2.0 * density - 1.0).astype(np.float32)[..., None]
