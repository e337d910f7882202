"""Host batches made global arrays on the mesh ahead of the step (device prefetch)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from jax.sharding import Mesh

from jaxdiff.parallel.mesh import global_batch


class DevicePrefetcher:
    """Keeps the next ``size`` global batches on the devices ahead of the step.

    Wraps a checkpointable host iterator (``next`` gives this process's numpy batch;
    ``get_state``/``set_state`` as :func:`jaxdiff.data.make_iterator`'s). Each batch is
    made a global array on ``mesh`` (:func:`global_batch`) as soon as it is read, so the
    host-to-device copy of batch ``t + 1`` overlaps step ``t`` and the host never stalls
    the device while a batch is ready. :meth:`get_state` is the state of the first batch
    not yet handed out, so a checkpoint taken between steps resumes exactly, whatever is
    still in flight.

    Args:
        iterator: the host batch iterator.
        mesh: the mesh whose batch axes split the batches.
        size: batches kept on the devices (2: one being consumed, one arriving).
        transform: applied to each host batch first (e.g. dropping keys the step ignores).
    """

    def __init__(
        self,
        iterator: Any,
        mesh: Mesh,
        size: int = 2,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"prefetch size={size} must be >= 1")
        self._iterator, self._mesh, self._size = iterator, mesh, size
        self._transform = transform or (lambda batch: batch)
        self._queue: collections.deque = collections.deque()

    def __iter__(self) -> DevicePrefetcher:
        return self

    def _fill(self) -> None:
        while len(self._queue) < self._size:
            state = self._iterator.get_state()
            try:
                host = next(self._iterator)
            except StopIteration:
                return
            self._queue.append((state, global_batch(self._transform(host), self._mesh)))

    def __next__(self) -> Any:
        self._fill()
        if not self._queue:
            raise StopIteration
        _, batch = self._queue.popleft()
        self._fill()  # start the next copies before the caller launches its step
        return batch

    def get_state(self) -> Any:
        """The host iterator's state at the first batch not yet returned."""
        return self._queue[0][0] if self._queue else self._iterator.get_state()

    def set_state(self, state: Any) -> None:
        """Drops the batches in flight and moves the host iterator to ``state``."""
        self._queue.clear()
        self._iterator.set_state(state)

    def start_prefetch(self) -> None:
        """Starts the host iterator's own read-ahead (e.g. its worker processes)."""
        if hasattr(self._iterator, "start_prefetch"):
            self._iterator.start_prefetch()

    def close(self) -> None:
        """Drops the batches in flight and closes the host iterator."""
        self._queue.clear()
        if hasattr(self._iterator, "close"):
            self._iterator.close()


def prefetch_to_mesh(
    iterator: Any, mesh: Mesh, size: int = 2, transform: Callable[[Any], Any] | None = None
) -> DevicePrefetcher:
    """Wraps a host batch iterator so ``size`` global batches wait on the devices.

    See :class:`DevicePrefetcher`. Example::

        batches = prefetch_to_mesh(make_iterator(source, global_batch_size=256), mesh)
        for _ in range(num_steps):
            state, metrics = train_step(state, next(batches), key)
    """
    return DevicePrefetcher(iterator, mesh, size, transform)
