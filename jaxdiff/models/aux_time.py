"""A second per-sample scalar as network input: ``aux_time`` of the UNet and DiT.

MeanFlow's interval ``t - r`` or a guidance scale ``w`` is embedded and added to the
conditioning vector.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import NoiseEmbedding


class AuxEmbedding(NoiseEmbedding):
    """Embeds a second per-sample scalar (``aux_time``) into the conditioning vector.

    :class:`~jaxdiff.models.layers.NoiseEmbedding`'s features and ``Dense -> SiLU ->
    Dense``, with the last kernel starting at zero: the embedding is exactly zero at
    initialisation, so a network given this input starts as the same function as one
    without it (a student initialised from a teacher's weights matches the teacher for
    every ``aux_time``), and training moves the last layer first, as with adaLN-Zero.
    Its Fourier bank has its own seed, so it is not the noise label's.
    """

    fourier_seed: int = 1
    zero_init_output: bool = True


def aux_time_embedding(
    module: nn.Module,
    aux_time: jax.Array | None,
    batch: int,
    features: int,
    out_features: int,
    kw: dict,
) -> jax.Array | None:
    """The ``aux_time`` embedding of a UNet/DiT, or None when ``aux_time_embed`` is off.

    ``module`` supplies the fields ``aux_time_embed``, ``aux_time_scale`` and
    ``embedding``; the embedding's params live under ``aux_time_embed``.

    Raises:
      ValueError: ``aux_time`` given to a network built without ``aux_time_embed``, or
        of a shape other than ``[B]`` / scalar.
    """
    if not module.aux_time_embed:
        if aux_time is not None:
            raise ValueError(
                f"got aux_time of shape {jnp.shape(aux_time)} but aux_time_embed=False: build "
                "the network with aux_time_embed=True to condition on a second scalar"
            )
        return None
    if aux_time is None:
        # Created even without a value, so init (which passes none) sees the trained tree.
        aux_time = jnp.zeros((batch,), jnp.float32)
    if jnp.ndim(aux_time) > 1 or jnp.size(aux_time) not in (1, batch):
        raise ValueError(
            f"aux_time has shape {jnp.shape(aux_time)}, expected ({batch},) or a scalar: "
            "pass one value per sample"
        )
    value = jnp.broadcast_to(jnp.asarray(aux_time, jnp.float32).reshape(-1), (batch,))
    return AuxEmbedding(
        features, out_features, module.embedding, module.aux_time_scale, name="aux_time_embed", **kw
    )(value)


__all__ = ["AuxEmbedding", "aux_time_embedding"]
