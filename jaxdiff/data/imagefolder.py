"""Image folders as random-access sources, decoded and center-cropped like ADM.

Two layouts are accepted (extensions ``.jpg``, ``.jpeg``, ``.png``, ``.webp``, any case):

* **Class subfolders** (ImageNet style): ``root/<class>/**/<image>``. The label of an
  image is the index of its class folder in sorted order; ``source.classes`` lists the
  names.
* **Flat**: ``root/<image>``. Unlabelled (``info.num_classes is None``).

Every mode Pillow decodes (grey, RGBA, palette, CMYK, 16-bit) becomes RGB, then the image
is cropped with guided-diffusion's ``center_crop_arr`` convention (:func:`center_crop_arr`),
so a model trained here sees the same pixels as one trained with ADM's or DiT's loaders.
Examples are ``{"image": float32 [S, S, 3] in [-1, 1], "label": int32}``.

Files are listed and read through :mod:`jaxdiff.utils.storage`, so ``gs://`` folders
work. For large datasets, convert the folder once with ``python -m jaxdiff.data.prepare``
and train from the shards (``get_dataset("arrayrecord", path=...)``): decoding JPEGs on
the fly costs far more host CPU than reading prepared pixels.

Example::

    source = ImageFolderSource("data/imagenet/train", image_size=64)
    source.classes[:2], source.info.num_classes   # (['n01440764', 'n01443537'], 1000)
    source[0]["image"].shape                      # (64, 64, 3)
"""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxdiff.data.sources import Batch, DatasetInfo
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.utils import storage

log = logging.getLogger(__name__)

#: File name endings recognised as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Everything Pillow raises for a bad file. Truncated data is an OSError as long as
# ImageFile.LOAD_TRUNCATED_IMAGES stays False (never set it: it silently pads with grey).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)
_SKIP_HINT = (
    "delete or replace it, or pass skip_corrupt=True (--config.data.skip_corrupt=True for "
    "training, --skip_corrupt for python -m jaxdiff.data.prepare) to skip unreadable images"
)


class CorruptImageError(InvalidArgumentError):
    """An image file that cannot be read or decoded.

    Attributes:
        path: The file.
        detail: What went wrong, without the advice the message adds.
    """

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"cannot decode image {path} ({detail}); {_SKIP_HINT}")
        self.path = path
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its fields when it crosses a process boundary (prepare's workers).
        return (type(self), (self.path, self.detail))


def uint8_to_unit(image: np.ndarray) -> np.ndarray:
    """Maps uint8 pixels to float32 in [-1, 1] as ``x / 127.5 - 1`` (ADM's convention).

    The one place this mapping lives, so image folders and prepared shards give
    bit-identical floats for the same pixels.
    """
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def check_image_size(image_size: Any) -> int:
    """Returns ``image_size`` as an int, or raises naming the flag that sets it."""
    integer = isinstance(image_size, int | np.integer) and not isinstance(image_size, bool)
    if not integer or image_size < 1:
        raise InvalidArgumentError(
            f"image_size must be a positive integer, got {image_size!r}; pass e.g. "
            "image_size=64 (--config.data.image_size=64, or --image_size=64 for prepare)"
        )
    return int(image_size)


def is_image_file(name: str) -> bool:
    """Whether ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts a decoded image of any mode to 8-bit RGB.

    Alpha is dropped, not composited (what ``Image.convert("RGB")`` and ADM do). 16-bit
    and 32-bit integer grey images are scaled from 0..65535 to 0..255: Pillow's own
    conversion clips them at 255, which turns most 16-bit PNGs white.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I;16N", "I" (16-bit PNGs)
        grey = np.asarray(image).astype(np.float64) / 257.0
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """Resizes and center-crops ``image`` to ``[image_size, image_size, C]`` (ADM's recipe).

    The steps of guided-diffusion's ``center_crop_arr``: while the short side is at least
    twice ``image_size``, halve both sides (integer division) with a BOX filter; then
    resize with BICUBIC so the short side is ``image_size`` (both sides scaled by
    ``image_size / short`` and rounded); then cut the ``image_size`` square at offsets
    ``((H - image_size) // 2, (W - image_size) // 2)``.

    Args:
        image: A decoded Pillow image (convert it to RGB first for 3 channels).
        image_size: Side of the output square.

    Returns:
        uint8 array ``[image_size, image_size, C]``.

    Example:
        >>> crop = center_crop_arr(Image.new("RGB", (40, 20)), 8)
        >>> crop.shape
        (8, 8, 3)
    """
    image_size = check_image_size(image_size)
    # Repeated BOX halving first: a single BICUBIC step from far above the target size
    # aliases; ADM predates Pillow's ``reducing_gap`` and did this by hand.
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top : top + image_size, left : left + image_size])


def decode_image(data: bytes, image_size: int, *, name: str = "<bytes>") -> np.ndarray:
    """Decodes encoded image bytes to the uint8 RGB ADM center crop ``[S, S, 3]``.

    Args:
        data: Contents of a JPEG/PNG/WebP (any format Pillow reads) file.
        image_size: Side ``S`` of the output square.
        name: File name used in error messages.

    Returns:
        uint8 array ``[image_size, image_size, 3]``.

    Raises:
        CorruptImageError: If the bytes are empty, truncated or not an image.
    """
    image_size = check_image_size(image_size)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: Image.open only reads the header
            return center_crop_arr(to_rgb(image), image_size)
    except _DECODE_ERRORS as err:
        if isinstance(err, UnidentifiedImageError):  # its text shows a BytesIO repr
            detail = f"not a JPEG/PNG/WebP image: {len(data)} bytes of unknown format"
        else:
            detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise CorruptImageError(name, detail) from err


def load_image(path: storage.PathLike, image_size: int) -> np.ndarray:
    """Reads and decodes one image file (local or cloud) to its uint8 ``[S, S, 3]`` crop.

    Raises:
        CorruptImageError: If the file cannot be read or decoded.
    """
    name = os.fspath(path)
    try:
        data = storage.read_bytes(path)
    except OSError as err:
        raise CorruptImageError(name, f"unreadable: {err}") from err
    return decode_image(data, image_size, name=name)


def _walk_images(folder: Any, prefix: str) -> list[str]:
    """Image files under ``folder`` (recursively), as sorted ``prefix/relative`` paths."""
    found = []
    for entry in storage.listdir(folder):
        if entry.startswith("."):  # .DS_Store, ._x.jpg, .ipynb_checkpoints, ...
            continue
        if is_image_file(entry):
            found.append(f"{prefix}/{entry}")
        elif storage.isdir(folder / entry):
            found.extend(_walk_images(folder / entry, f"{prefix}/{entry}"))
    return sorted(found)


def list_image_folder(
    path: storage.PathLike,
) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    """Lists the images of a folder in a fixed order.

    Args:
        path: Image folder, local or ``gs://...``; see the module docstring for layouts.

    Returns:
        ``(files, labels, classes)``: image paths relative to ``path`` (``/``-separated,
        sorted), int32 labels aligned with ``files`` and the sorted class names, or
        ``(files, None, None)`` for a flat folder.

    Raises:
        InvalidArgumentError: If the folder is missing or has no images, mixes top-level
            images with class subfolders, or has a class subfolder without images.
    """
    root = storage.as_path(path)
    if not storage.isdir(root):
        raise InvalidArgumentError(
            f"image folder {os.fspath(root)} does not exist or is not a folder; pass the "
            "folder holding <class>/<image> subfolders or images (--config.data.path=DIR "
            "for training, --src=DIR for python -m jaxdiff.data.prepare)"
        )
    entries = [e for e in storage.listdir(root) if not e.startswith(".")]
    top = sorted(e for e in entries if is_image_file(e))
    subdirs = [e for e in entries if not is_image_file(e) and storage.isdir(root / e)]
    per_class = {d: _walk_images(root / d, d) for d in subdirs}
    with_images = [d for d in subdirs if per_class[d]]
    ext = "/".join(IMAGE_EXTENSIONS)
    if top and with_images:
        raise InvalidArgumentError(
            f"image folder {os.fspath(root)} mixes images at the top level (e.g. {top[0]}) "
            f"with class subfolders holding images (e.g. {with_images[0]}/); put every image "
            "in a class subfolder (labelled) or all of them at the top level (unlabelled)"
        )
    if top:
        return top, None, None
    if not with_images:
        raise InvalidArgumentError(
            f"no images ({ext}) found in {os.fspath(root)} or its subfolders; check the path "
            "(--config.data.path for training, --src for python -m jaxdiff.data.prepare)"
        )
    empty = [d for d in subdirs if not per_class[d]]
    if empty:
        raise InvalidArgumentError(
            f"class subfolders {empty[:5]} of {os.fspath(root)} contain no images ({ext}); "
            "every subfolder is a class, so remove the empty ones (or add images)"
        )
    classes = sorted(subdirs)
    files = [f for c in classes for f in per_class[c]]
    labels = np.concatenate(
        [np.full(len(per_class[c]), i, dtype=np.int32) for i, c in enumerate(classes)]
    )
    return files, labels, classes


class ImageFolderSource:
    """Random-access source over an image folder, decoded and cropped on every read.

    Args:
        path: Image folder (local or ``gs://``); class subfolders or flat.
        image_size: Side ``S`` of the square crops.
        skip_corrupt: If ``True``, an unreadable image is replaced by the next readable
            one (wrapping around), so ``len`` and the order of the others stay fixed;
            each skipped file is logged once and counted in :attr:`num_skipped`. If
            ``False``, reading it raises :class:`CorruptImageError`.
        name: Dataset name for :attr:`info`.
        split: Split name for :attr:`info`.

    Attributes:
        info: ``image_shape=(S, S, 3)``, ``num_classes`` (``None`` for a flat folder).
        root: The folder, as a string.
        files: Image paths relative to ``root``, sorted (class, then path).
        labels: int32 labels aligned with ``files``, or ``None``.
        classes: Sorted class-folder names, or ``None``.

    Only paths and settings are stored (the source pickles small enough for grain's
    worker processes); the skip count is per process.

    Example::

        source = ImageFolderSource("data/flowers", image_size=32)
        batch = source.get_batch(np.arange(8))   # {"image": [8, 32, 32, 3], "label": [8]}
    """

    def __init__(
        self,
        path: storage.PathLike,
        *,
        image_size: int,
        skip_corrupt: bool = False,
        name: str = "imagefolder",
        split: str = "train",
    ) -> None:
        self.image_size = check_image_size(image_size)
        self.skip_corrupt = bool(skip_corrupt)
        self.root = storage.to_str(path)
        self.files, self.labels, self.classes = list_image_folder(self.root)
        self.info = DatasetInfo(
            name=name,
            split=split,
            image_shape=(self.image_size, self.image_size, 3),
            num_classes=None if self.classes is None else len(self.classes),
            num_examples=len(self.files),
        )
        self._init_skip_state()

    def _init_skip_state(self) -> None:
        self._bad: dict[int, str] = {}  # index -> error message, for skipped files
        self._lock = threading.Lock()  # grain reads batches from several threads

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"], state["_bad"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_skip_state()

    def __len__(self) -> int:
        """Number of images."""
        return len(self.files)

    @property
    def num_skipped(self) -> int:
        """Number of distinct unreadable files skipped so far in this process."""
        return len(self._bad)

    @property
    def skipped_files(self) -> list[str]:
        """Full paths of the files skipped so far in this process, sorted."""
        return sorted(self.file_path(i) for i in self._bad)

    def file_path(self, index: int) -> str:
        """Full path (or URL) of image ``index``."""
        return storage.join(self.root, self.files[index])

    def read_uint8(self, index: int) -> np.ndarray:
        """Image ``index`` as its uint8 ``[S, S, 3]`` crop, never replaced.

        Raises:
            CorruptImageError: If the file cannot be read or decoded (even with
                ``skip_corrupt=True``; :mod:`jaxdiff.data.prepare` uses this to drop it).
        """
        return load_image(self.file_path(index), self.image_size)

    def _read_or_replace(self, index: int) -> tuple[np.ndarray, int]:
        """Returns the crop of ``index``, or of the next readable index if skipping."""
        n = len(self.files)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images in {self.root}")
        index %= n
        for step in range(n):
            candidate = (index + step) % n
            if candidate in self._bad:
                continue
            try:
                return self.read_uint8(candidate), candidate
            except CorruptImageError as err:
                if not self.skip_corrupt:
                    raise
                with self._lock:
                    first_time = candidate not in self._bad
                    self._bad[candidate] = err.detail
                if first_time:
                    log.warning("skipping unreadable image %s (%s)", err.path, err.detail)
        raise InvalidArgumentError(
            f"none of the {n} images in {self.root} can be decoded (e.g. "
            f"{self.file_path(0)}: {self._bad[0]}); check --config.data.path"
        )

    def __getitem__(self, index: int) -> Batch:
        """Returns ``{"image": float32 [S, S, 3] in [-1, 1], "label": int32}``."""
        pixels, actual = self._read_or_replace(index)
        example = {"image": uint8_to_unit(pixels)}
        if self.labels is not None:
            example["label"] = self.labels[actual]
        return example

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Decodes the images at ``indices`` and returns them stacked."""
        reads = [self._read_or_replace(i) for i in np.asarray(indices).reshape(-1)]
        if not reads:
            s = self.image_size
            batch = {"image": np.zeros((0, s, s, 3), np.float32)}
        else:
            batch = {"image": uint8_to_unit(np.stack([pixels for pixels, _ in reads]))}
        if self.labels is not None:
            batch["label"] = self.labels[np.asarray([i for _, i in reads], dtype=np.int64)]
        return batch

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root!r}, {self.info})"


__all__ = [
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "ImageFolderSource",
    "center_crop_arr",
    "check_image_size",
    "decode_image",
    "is_image_file",
    "list_image_folder",
    "load_image",
    "to_rgb",
    "uint8_to_unit",
]
