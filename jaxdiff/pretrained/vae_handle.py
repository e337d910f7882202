"""A converted VAE as jitted, batched ``encode``/``decode`` on numpy arrays.

:class:`PretrainedVAE` pairs an :class:`~jaxdiff.models.vae.AutoencoderKL` and its params
with the :class:`~jaxdiff.pretrained.vae.LatentScaling` of the diffusion model that uses
it. ``jaxdiff.pretrained.load_vae(path, scaling)`` builds one from a converted file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.models.vae import AutoencoderKL
from jaxdiff.pretrained.vae import LatentScaling, build


class PretrainedVAE:
    """Jitted, batched encode/decode of numpy arrays with a pretrained VAE.

    Every method takes a whole array (e.g. a dataset), runs it in batches of
    ``batch_size`` (the last batch zero-padded, so each method compiles once) and returns
    float32 numpy arrays. Images are NHWC in ``[-1, 1]``; latents are NHWC.

    Example:
      >>> dit = LATENT_SCALINGS["dit"]
      >>> vae = PretrainedVAE.from_params(pre.config, pre.params, dit)  # doctest: +SKIP
      >>> z = vae.encode(images, key=jax.random.key(0))  # doctest: +SKIP
    """

    def __init__(
        self, module: AutoencoderKL, params: Any, scaling: LatentScaling, batch_size: int = 16
    ):
        """Wraps a module, its (possibly boxed) params and a latent scaling."""
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
        self.module, self.scaling, self.batch_size = module, scaling, int(batch_size)
        self.params = jax.device_put(nn.unbox(params))
        low, high = scaling.pixel_range

        def posterior(params, images):
            x = (images + 1) * ((high - low) / 2) + low
            return module.apply({"params": params}, x, method=AutoencoderKL.encode)

        def moments(params, images):
            post = posterior(params, images)
            return post.mean, post.std

        def encode(params, images, index, key):
            post = posterior(params, images)
            if key is None:
                return scaling.to_model(post.mean)
            # One noise draw per example index: results do not depend on batch_size.
            draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), post.mean.shape[1:])  # noqa: E731
            return scaling.to_model(post.mean + post.std * jax.vmap(draw)(index))

        def decode(params, latents, clip):
            raw = scaling.to_raw(latents.astype(jnp.float32))
            x = module.apply({"params": params}, raw, method=AutoencoderKL.decode)
            x = (x - low) * (2 / (high - low)) - 1
            return jnp.where(clip, jnp.clip(x, -1, 1), x)  # traced: one compile for both

        self.decode_fn = lambda params, latents: decode(params, latents, True)  # noqa: E731
        """Pure ``(params, scaled latents) -> images in [-1, 1]``, to fuse into a jit."""
        self._moments = jax.jit(moments)
        self._encode = jax.jit(encode)
        self._decode = jax.jit(decode)

    @classmethod
    def from_params(
        cls,
        config: Mapping[str, Any],
        params: Any,
        scaling: LatentScaling | None = None,
        *,
        batch_size: int = 16,
        dtype: Any = None,
    ) -> PretrainedVAE:
        """Builds the handle from a config and params (e.g. of a converted file).

        Args:
          config: A VAE config (:data:`.vae.PRESETS`, :func:`.vae.infer_config`).
          params: The params (nested dict, boxed or not).
          scaling: The latent space; None takes the config's ``scaling_factor``.
          batch_size: Examples per jitted call (a smaller call runs at its own size).
          dtype: Compute dtype override (e.g. ``jnp.bfloat16``); params stay as given.
        """
        config = dict(config, **({"dtype": jnp.dtype(dtype).name} if dtype else {}))
        module, _ = build(config)
        scaling = LatentScaling.from_config(config) if scaling is None else scaling
        return cls(module, params, scaling, batch_size)

    def _check(self, x: Any, channels: int, what: str, multiple: int) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim != 4 or x.shape[-1] != channels or x.shape[0] == 0:
            raise InvalidArgumentError(
                f"{what} must be a non-empty [N, H, W, {channels}] array, got shape {x.shape}"
            )
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise InvalidArgumentError(
                f"{what} of shape {x.shape}: H and W must be multiples of {multiple}"
            )
        return x

    def _batched(self, fn: Callable, arrays: Sequence[np.ndarray], *static: Any) -> Any:
        # A call with fewer examples than batch_size runs at its own size: padding one
        # 512x512 image to 16 would cost 16x the decoder's memory (GBs on a CPU).
        n, outs = len(arrays[0]), []
        bs = min(self.batch_size, n)
        for start in range(0, n, bs):
            chunk = [a[start : start + bs] for a in arrays]
            m = len(chunk[0])
            pad = [np.pad(c, [(0, bs - m)] + [(0, 0)] * (c.ndim - 1)) for c in chunk]
            res = fn(self.params, *pad, *static)
            outs.append(jax.tree.map(lambda r: np.asarray(r, np.float32)[:m], res))
        return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)

    def encode_moments(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Posterior ``(mean, std)`` of raw (unscaled) latents, each ``[N, h, w, C]``."""
        x = self._check(images, self.module.in_channels, "images", self.module.downscale)
        return self._batched(self._moments, [x])

    def encode(self, images: Any, key: jax.Array | None = None) -> np.ndarray:
        """Scaled latents of ``[N, H, W, C]`` images: a posterior sample (``key``) or mean."""
        x = self._check(images, self.module.in_channels, "images", self.module.downscale)
        return self._batched(self._encode, [x, np.arange(len(x), dtype=np.int32)], key)

    def decode(self, latents: Any, clip: bool = True) -> np.ndarray:
        """Images in ``[-1, 1]`` (clipped unless ``clip=False``) of scaled latents."""
        z = self._check(latents, self.module.latent_channels, "latents", 1)
        return self._batched(self._decode, [z], np.bool_(clip))


__all__ = ["PretrainedVAE"]
