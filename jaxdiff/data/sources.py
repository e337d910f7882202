"""Random-access data sources and their metadata.

Every dataset in jaxdiff is a *random-access source*: an object with ``__len__`` and
``__getitem__(i) -> dict`` (the protocol grain's ``RandomAccessDataSource`` uses), plus an
``info`` attribute describing it. Examples and batches always store the data tensor under
the key ``"image"`` -- also for 2-D toy points, whose "image" is a ``[2]`` vector -- so
training code is the same for every dataset. Labelled datasets add an int32 ``"label"``;
unlabelled ones leave the key out and report ``num_classes=None``.

A source may also implement ``get_batch(indices) -> dict`` returning whole stacked
batches; :func:`jaxdiff.data.make_iterator` uses it when present, which keeps host-side
work to one vectorised gather per batch for in-memory data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: A batch or a single example: ``{"image": float32 [..., *shape], "label": int32 [...]}``.
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset split.

    Attributes:
        name: Dataset name as given to :func:`jaxdiff.data.get_dataset`.
        split: Split name (e.g. ``"train"``).
        image_shape: Shape of one ``"image"`` entry: ``(H, W, C)`` for images, ``(2,)`` for
            2-D toys.
        num_classes: Number of label classes, or ``None`` if the dataset has no labels.
        num_examples: Number of examples in the split.
    """

    name: str
    split: str
    image_shape: tuple[int, ...]
    num_classes: int | None
    num_examples: int


@runtime_checkable
class DataSource(Protocol):
    """What :func:`jaxdiff.data.make_iterator` needs from a dataset."""

    info: DatasetInfo

    def __len__(self) -> int:
        """Number of examples."""
        ...

    def __getitem__(self, index: int) -> Batch:
        """One example as a dict of numpy arrays."""
        ...


def stack_examples(examples: Sequence[Mapping[str, Any]]) -> Batch:
    """Stacks a sequence of example dicts into one batch dict.

    Args:
        examples: Non-empty sequence of dicts sharing the same keys.

    Returns:
        Dict mapping each key to ``np.stack`` of its values.

    Raises:
        ValueError: If ``examples`` is empty.
    """
    if not examples:
        raise ValueError("cannot stack an empty list of examples")
    return {key: np.stack([np.asarray(ex[key]) for ex in examples]) for key in examples[0]}


class ArraySource:
    """In-memory random-access source over aligned numpy arrays.

    Args:
        image: Data array ``[N, *image_shape]``; stored as float32.
        label: Optional labels ``[N]``; stored as int32.
        name: Dataset name for :attr:`info`.
        split: Split name for :attr:`info`.
        num_classes: Number of classes; inferred as ``label.max() + 1`` if ``None`` and
            labels are given.

    Raises:
        ValueError: If ``image`` and ``label`` have different lengths.

    Example:
        >>> src = ArraySource(np.zeros((4, 2)), np.arange(4), name="demo")
        >>> len(src), src[1]["label"].item(), src.info.num_classes
        (4, 1, 4)
    """

    def __init__(
        self,
        image: np.ndarray,
        label: np.ndarray | None = None,
        *,
        name: str = "arrays",
        split: str = "train",
        num_classes: int | None = None,
    ) -> None:
        self._image = np.ascontiguousarray(image, dtype=np.float32)
        self._label = None if label is None else np.ascontiguousarray(label, dtype=np.int32)
        if self._label is not None and self._label.shape != (len(self._image),):
            raise ValueError(
                f"label must have shape ({len(self._image)},) to match image "
                f"{self._image.shape}; got {self._label.shape}"
            )
        if num_classes is None and self._label is not None and len(self._label):
            num_classes = int(self._label.max()) + 1
        self.info = DatasetInfo(
            name=name,
            split=split,
            image_shape=tuple(self._image.shape[1:]),
            num_classes=num_classes,
            num_examples=len(self._image),
        )

    def __len__(self) -> int:
        """Number of examples."""
        return len(self._image)

    def __getitem__(self, index: int) -> Batch:
        """Returns example ``index`` as ``{"image": ..., "label": ...}``."""
        example = {"image": self._image[index]}
        if self._label is not None:
            example["label"] = self._label[index]
        return example

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Returns the examples at ``indices`` stacked, with one vectorised gather."""
        batch = {"image": self._image[indices]}
        if self._label is not None:
            batch["label"] = self._label[indices]
        return batch

    def __repr__(self) -> str:
        return f"ArraySource({self.info})"
