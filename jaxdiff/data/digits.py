"""scikit-learn's bundled 8x8 handwritten digits, the default offline dataset.

The 1,797 images ship inside the scikit-learn wheel, so nothing is downloaded. Pixel
values 0..16 are mapped linearly to [-1, 1] (0 -> -1, 16 -> 1).

Split: a fixed, stratified hold-out of :data:`NUM_TEST` = 297 images (about 30 per
class) forms ``"test"``; the other 1,500 form ``"train"``; ``"all"`` is every image in
scikit-learn's order. The split is computed with numpy only (a seeded permutation, then
evenly spaced picks from the class-sorted list), so it does not change with the
scikit-learn version.
"""

from __future__ import annotations

import functools

import numpy as np

#: Number of held-out (``"test"``) images.
NUM_TEST = 297
#: Number of classes (digits 0-9).
NUM_CLASSES = 10
SPLITS = ("train", "test", "all")
_SPLIT_SEED = 20240521


@functools.cache
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    # Cached: the loader parses a CSV (~20 ms); the arrays are never handed out directly.
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = bunch.images.astype(np.float32)[..., None] * (2.0 / 16.0) - 1.0
    labels = bunch.target.astype(np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@functools.cache
def _test_indices() -> np.ndarray:
    _, labels = _raw_digits()
    n = len(labels)
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    # Group the shuffled indices by class (stable sort keeps the random order inside a
    # class); evenly spaced picks then take ~NUM_TEST/10 random images from every class.
    by_class = perm[np.argsort(labels[perm], kind="stable")]
    picks = np.round(np.linspace(0, n - 1, NUM_TEST)).astype(np.int64)
    test = np.sort(by_class[picks])
    test.flags.writeable = False
    return test


def split_indices(split: str) -> np.ndarray:
    """Returns the indices (into scikit-learn's order) of a digits split.

    Args:
        split: One of ``"train"``, ``"test"``, ``"all"``.

    Returns:
        Sorted int64 index array.

    Raises:
        ValueError: If ``split`` is unknown.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; use one of {SPLITS}")
    n = len(_raw_digits()[1])
    if split == "all":
        return np.arange(n)
    test = _test_indices()
    if split == "test":
        return test.copy()
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask)


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Loads the 8x8 digits as images in [-1, 1] and integer labels.

    Args:
        split: ``"train"`` (1,500 images), ``"test"`` (297, stratified, fixed) or
            ``"all"`` (1,797).

    Returns:
        ``(images, labels)``: float32 ``[N, 8, 8, 1]`` in [-1, 1] and int32 ``[N]`` in
        0..9. Fresh arrays on every call; mutating them is safe.

    Raises:
        ValueError: If ``split`` is unknown.

    Example:
        >>> images, labels = load_digits("test")
        >>> images.shape, labels.shape
        ((297, 8, 8, 1), (297,))
    """
    idx = split_indices(split)
    images, labels = _raw_digits()
    return images[idx], labels[idx]
