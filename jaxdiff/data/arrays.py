"""Array datasets stored as ``.npy`` files: pre-extracted latents, features, small image sets.

:class:`NpySource` reads either

* one ``.npy`` file holding the data ``[N, *shape]`` (unlabelled), or
* a folder holding ``images.npy`` (``[N, *shape]``) and, optionally, ``labels.npy``
  (integer ``[N]``).

The data may have any real dtype and any per-example shape; examples come back as float32
*exactly as stored* -- no ``[-1, 1]`` normalisation -- since arrays such as VAE latents
carry their own scale. Local files are memory-mapped, so a latent set larger than host
memory is read one batch at a time. Write a set with plain numpy::

    np.save(f"{out}/images.npy", latents)  # float16/float32 [N, 32, 32, 4]
    np.save(f"{out}/labels.npy", labels)   # int [N]

then train with ``--config.data.name=npy --config.data.path=OUT``.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any

import numpy as np

from jaxdiff.data.sources import Batch, DatasetInfo
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.utils import storage

#: File names looked for when ``path`` is a folder.
IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"

_LAYOUT = (
    f"a .npy file of data [N, *shape], or a folder holding {IMAGES_FILE} [N, *shape] and "
    f"optionally {LABELS_FILE} (int [N])"
)


def _resolve_files(path: str) -> tuple[str, str | None]:
    """``(images file, labels file or None)`` for a file or folder ``path``."""
    if storage.isdir(path):
        images = storage.join(path, IMAGES_FILE)
        if not storage.isfile(images):
            found = storage.listdir(path)
            shown = ", ".join(found[:10]) + (", ..." if len(found) > 10 else "")
            raise FileNotFoundError(
                f"npy dataset folder {path} has no {IMAGES_FILE} (it holds: {shown or 'nothing'})"
                f"; --config.data.path must be {_LAYOUT}"
            )
        labels = storage.join(path, LABELS_FILE)
        return images, labels if storage.isfile(labels) else None
    if storage.isfile(path):
        return path, None
    raise FileNotFoundError(f"npy dataset path {path} does not exist; it must be {_LAYOUT}")


def _load_array(path: str, *, mmap: bool) -> np.ndarray:
    """Opens one ``.npy`` file: memory-mapped when local and ``mmap``, else read whole."""
    try:
        if storage.is_remote(path):
            # Object stores cannot be memory-mapped; the whole file is read into memory.
            array = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
        else:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as err:
        # numpy says "Object arrays cannot be loaded when allow_pickle=False" (or that
        # Python objects cannot be memory-mapped) for pickled object arrays.
        raise InvalidArgumentError(
            f"cannot read {path} as a numeric array ({err}); object/pickled arrays are not "
            "supported: save a numeric array, e.g. np.save(path, np.asarray(x, np.float32))"
        ) from err
    if not isinstance(array, np.ndarray):  # np.load returns an NpzFile for .npz archives
        if hasattr(array, "close"):
            array.close()
        raise InvalidArgumentError(
            f"{path} is not a .npy array file (an .npz archive?); save each array with "
            "np.save, as " + _LAYOUT
        )
    return array


def _check_images(path: str, image: np.ndarray) -> None:
    if image.dtype.kind not in "biuf":
        raise InvalidArgumentError(
            f"{path} has dtype {image.dtype}; the data must be a real number array (float, "
            "int or bool): convert it, e.g. np.save(path, x.astype(np.float32))"
        )
    if image.ndim < 2 or len(image) == 0:
        raise InvalidArgumentError(
            f"{path} has shape {image.shape}; the data must be [N, *shape] with N >= 1 and at "
            "least one axis per example (reshape scalars to [N, 1])"
        )


def _check_labels(path: str, label: np.ndarray, num_examples: int) -> np.ndarray:
    if label.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"{path} has dtype {label.dtype}; labels must be integers: save labels.astype(np.int32)"
        )
    if label.shape != (num_examples,):
        raise InvalidArgumentError(
            f"{path} has shape {label.shape} but the data has {num_examples} examples; "
            f"labels must be [N] = ({num_examples},), one per example"
        )
    if label.min() < 0:
        raise InvalidArgumentError(
            f"{path} holds negative labels (min {label.min()}); classes must be numbered "
            "0..num_classes-1 (remap them, e.g. with np.unique(labels, return_inverse=True))"
        )
    return label.astype(np.int32)


class NpySource:
    """Random-access source over ``.npy`` arrays, memory-mapped when local.

    Args:
        path: A ``.npy`` file of data ``[N, *shape]`` (unlabelled), or a folder holding
            ``images.npy`` and optionally ``labels.npy`` (integer ``[N]``). Local paths are
            memory-mapped, so only the examples a batch reads are loaded. Cloud paths
            (``gs://...``) cannot be memory-mapped: the whole file is read into host memory
            (once per process, and once per worker process after unpickling).
        name: Dataset name for :attr:`info`.
        split: Split name for :attr:`info` (the same files serve every split).

    Attributes:
        info: Dataset metadata; ``num_classes`` is ``labels.max() + 1`` (``None`` without
            labels).

    Raises:
        FileNotFoundError: If ``path`` (or a folder's ``images.npy``) does not exist.
        InvalidArgumentError: For an object or non-numeric dtype, a ``.npz`` archive,
            labels of the wrong length or dtype, or negative labels.

    Example:
        >>> src = NpySource("/data/latents")  # images.npy [N, 32, 32, 4], labels.npy [N]
        >>> src.get_batch(np.array([5, 0]))["image"].shape
        (2, 32, 32, 4)
    """

    def __init__(self, path: str | os.PathLike, *, name: str = "npy", split: str = "train") -> None:
        self.path = storage.to_str(path)
        self._images_file, labels_file = _resolve_files(self.path)
        self._lock = threading.Lock()
        self._image: np.ndarray | None = _load_array(self._images_file, mmap=True)
        _check_images(self._images_file, self._image)
        n = len(self._image)
        # Labels are small ([N] ints): load them whole, which also makes the checks cheap.
        self._label = None
        if labels_file is not None:
            self._label = _check_labels(labels_file, _load_array(labels_file, mmap=False), n)
        self.info = DatasetInfo(
            name=name,
            split=split,
            image_shape=tuple(self._image.shape[1:]),
            num_classes=None if self._label is None else int(self._label.max()) + 1,
            num_examples=n,
        )

    def _images(self) -> np.ndarray:
        # After unpickling (grain worker processes) the mapping is reopened on first use;
        # the lock keeps prefetch threads from opening it several times.
        if self._image is None:
            with self._lock:
                if self._image is None:
                    self._image = _load_array(self._images_file, mmap=True)
        return self._image

    def __getstate__(self) -> dict[str, Any]:
        # A pickled memmap would copy the whole array (and a lock cannot be pickled):
        # ship the file name and reopen it on the other side instead.
        state = self.__dict__.copy()
        state["_image"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Number of examples."""
        return self.info.num_examples

    def __getitem__(self, index: int) -> Batch:
        """Returns example ``index`` as ``{"image": float32, "label": int32}``."""
        example = {"image": np.array(self._images()[int(index)], dtype=np.float32)}
        if self._label is not None:
            example["label"] = self._label[int(index)]
        return example

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Returns the examples at ``indices`` stacked, read with one vectorised gather.

        Indices are read in ascending order (neighbouring rows share pages of the memory
        map, and the disk reads forward), then put back in the order asked for.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        order = np.argsort(idx, kind="stable")
        image = np.empty((len(idx), *self.info.image_shape), np.float32)
        image[order] = self._images()[idx[order]]  # the assignment casts to float32
        batch = {"image": image}
        if self._label is not None:
            batch["label"] = self._label[idx]
        return batch

    def __repr__(self) -> str:
        return f"NpySource({self.path!r}, {self.info})"


__all__ = ["IMAGES_FILE", "LABELS_FILE", "NpySource"]
