"""The batch side of :mod:`jaxdiff.pretrained.encode`: a jitted, sharded VAE encoder.

:class:`BatchEncoder` turns image batches into the posterior moments the latent shards
store, split over this host's devices; :func:`read_ahead` keeps a few reads of the source
in flight while the devices encode.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.data import latents as latents_lib
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.parallel import batch_sharding, make_mesh, put_global, replicated


def moments_fn(vae: Any) -> tuple[Callable[[Any, jax.Array], tuple], Any]:
    """A pure ``(weights, images) -> (raw mean, raw std)`` for one jitted call, and weights.

    :class:`~jaxdiff.pretrained.vae_handle.PretrainedVAE` batches numpy arrays on the host, so
    its maths is traced here from its public ``module``, ``params`` and ``scaling``
    (tests check the result against its ``encode_moments``). Any other VAE's
    ``encode_moments`` must be traceable: a pytree VAE is passed as an argument; another
    object is closed over, which bakes its weights into the program (small models only).
    """
    module, params = getattr(vae, "module", None), getattr(vae, "params", None)
    if params is not None and callable(getattr(module, "encode", None)):
        low, high = getattr(vae.scaling, "pixel_range", (-1.0, 1.0))

        def moments(weights: Any, images: jax.Array) -> tuple:
            x = (images + 1) * ((high - low) / 2) + low  # [-1, 1] -> the VAE's own range
            post = module.apply({"params": weights}, x, method=type(module).encode)
            return post.mean, post.std

        return moments, params
    leaves = jax.tree.leaves(vae)
    if leaves and not (len(leaves) == 1 and leaves[0] is vae):
        return (lambda model, images: model.encode_moments(images)), vae
    return (lambda _, images: vae.encode_moments(images)), None


class BatchEncoder:
    """Jitted ``images -> {mean, std[, flipped]}`` over a mesh of this host's devices."""

    def __init__(self, vae: Any, *, batch_size: int, flip: bool) -> None:
        devices = jax.local_devices()
        self.mesh = make_mesh(devices=devices)
        n = len(devices)
        self.batch = max(n, math.ceil(batch_size / n) * n)  # every call: one full shape
        rep, self._data = replicated(self.mesh), batch_sharding(self.mesh)
        moments, weights = moments_fn(vae)

        def encode(weights: Any, images: jax.Array) -> dict[str, jax.Array]:
            mean, std = moments(weights, images)
            out = {latents_lib.MEAN: mean, latents_lib.STD: std}
            if flip:
                mean_f, std_f = moments(weights, images[:, :, ::-1])
                out.update({latents_lib.MEAN_FLIPPED: mean_f, latents_lib.STD_FLIPPED: std_f})
            return {k: v.astype(jnp.float32) for k, v in out.items()}

        fn = jax.jit(encode, in_shardings=(rep, self._data), out_shardings=self._data)
        weights = put_global(weights, rep)  # replicated once, not per call
        self._fn = lambda x: fn(weights, x)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """The ``[h, w, c]`` latent shape of one image of ``image_shape`` (traced only).

        Raises:
            InvalidArgumentError: if the VAE's latents are not ``[h, w, c]``.
        """
        spec = jax.ShapeDtypeStruct((self.batch, *image_shape), jnp.float32, sharding=self._data)
        shape = tuple(jax.eval_shape(self._fn, spec)[latents_lib.MEAN].shape[1:])
        if len(shape) != 3:
            raise InvalidArgumentError(f"the VAE returned latents of shape {shape}, not [h, w, c]")
        return shape

    def __call__(self, images: np.ndarray) -> dict[str, jax.Array]:
        """Starts encoding ``images`` (at most one batch); returns device arrays (padded)."""
        pad = self.batch - len(images)
        if pad:  # repeat the last image; its latents are dropped
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        return self._fn(put_global(np.asarray(images, np.float32), self._data))


def read_ahead(pool: futures.Executor, read: Callable, chunks: list, depth: int) -> Iterator:
    """``read(chunk)`` for each chunk in order, ``depth`` chunks in flight on ``pool``."""
    pending: collections.deque = collections.deque()
    it = iter(chunks)
    try:
        for chunk in it:
            pending.append(pool.submit(read, chunk))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()


__all__ = ["BatchEncoder", "moments_fn", "read_ahead"]
