"""Discriminator heads on multi-resolution features (DMD2 / NitroFusion style).

A :class:`DiscHead` takes a list of feature maps (``[B, H, W, C]``, one per resolution) or
feature vectors (``[B, D]``), the noise label and the class, and returns

* global logits ``[B]``: the mean over resolutions of each branch's spatially pooled
  logit, plus a projection term ``<embed(c), pooled features>`` when conditional;
* local (patch) logits ``[B, P]``: every spatial position of every branch.

Image branch, by ``form``:

* ``"jaxdiff"`` (default; DMD2-like, for small feature maps): Conv4x4/2 "SAME" ->
  GroupNorm -> SiLU (+ noise-label bias) -> Conv4x4/2 "SAME" -> GroupNorm -> SiLU ->
  Conv1x1, any spatial size;
* ``"dmd2"`` (DMD2's EDM ``cls_pred_branch`` layer for layer): Conv4x4 stride 2 padding 1
  -> GroupNorm(32) -> SiLU -> Conv4x4 stride 4 padding 0 -> GroupNorm(32) -> SiLU ->
  Conv1x1, no noise-label bias (the features already carry the noise level); an 8x8 map
  gives one logit, and maps under 8x8 are refused.

Vector branch (both forms): two SiLU MLP layers on ``[x, noise embedding]`` then a linear
logit. Whether a head is used globally or locally, and whether
its projection term is on, are *array* flags (:func:`head_logits`), so heads of every type
share one parameter structure and can be stacked in a pool (:mod:`jaxdiff.distill.pool`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _noise_features(noise_label: jax.Array) -> jax.Array:
    c = jnp.asarray(noise_label, jnp.float32)[:, None]
    freqs = jnp.asarray([1.0, 2.0, 4.0], jnp.float32)
    return jnp.concatenate([c, jnp.sin(c * freqs), jnp.cos(c * freqs)], axis=-1)


HEAD_FORMS = ("jaxdiff", "dmd2")
"""Image-branch layouts of :class:`DiscHead` (``"dmd2"`` = DMD2's ``cls_pred_branch``)."""


def _groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if c % g == 0 and c // g >= 2:
            return g
    return 1


class DiscHead(nn.Module):
    """One discriminator head over several feature resolutions.

    Attributes:
        width: channels (or hidden units) of each branch.
        num_classes: real classes for the projection term (0 = unconditional head; the
            null class ``num_classes`` gets its own embedding).
        form: image-branch layout, one of :data:`HEAD_FORMS`.
    """

    width: int = 64
    num_classes: int = 0
    form: str = "jaxdiff"

    def _image_branch(self, f: jax.Array, nemb: jax.Array, i: int) -> jax.Array:
        if self.form == "jaxdiff":
            h = nn.Conv(self.width, (4, 4), strides=(2, 2), padding="SAME", name=f"b{i}_c0")(f)
            h = nn.GroupNorm(_groups(self.width), name=f"b{i}_n0")(h)
            h = h + nn.Dense(self.width, name=f"b{i}_t")(nemb)[:, None, None, :]
            h = nn.silu(h)
            h = nn.Conv(self.width, (4, 4), strides=(2, 2), padding="SAME", name=f"b{i}_c1")(h)
            return nn.silu(nn.GroupNorm(_groups(self.width), name=f"b{i}_n1")(h))
        if self.form != "dmd2":
            raise ValueError(f"DiscHead form={self.form!r}: choose one of {HEAD_FORMS}")
        if self.width % 32:
            raise ValueError(
                f"the 'dmd2' head form uses GroupNorm(32): width={self.width} must be a "
                "multiple of 32 (or use form='jaxdiff')"
            )
        if min(f.shape[1:3]) < 8:
            raise ValueError(
                f"the 'dmd2' head form (Conv4x4/2 then Conv4x4/4) needs feature maps of at "
                f"least 8x8, got {f.shape[1:3]} for branch {i}: read larger features "
                "(feature_names) or use form='jaxdiff'"
            )
        # DMD2's Conv2d padding (1, then 0) and PyTorch's GroupNorm epsilon (1e-5).
        pad1 = ((1, 1), (1, 1))
        h = nn.Conv(self.width, (4, 4), strides=(2, 2), padding=pad1, name=f"b{i}_c0")(f)
        h = nn.silu(nn.GroupNorm(32, epsilon=1e-5, name=f"b{i}_n0")(h))
        h = nn.Conv(self.width, (4, 4), strides=(4, 4), padding="VALID", name=f"b{i}_c1")(h)
        return nn.silu(nn.GroupNorm(32, epsilon=1e-5, name=f"b{i}_n1")(h))

    @nn.compact
    def __call__(
        self, feats: Sequence[jax.Array], noise_label: jax.Array, cond: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns ``(global_logits [B], local_logits [B, P], projection [B])``."""
        nemb = _noise_features(noise_label)
        pooled_logits, local, proj = [], [], []
        for i, f in enumerate(feats):
            f = f.astype(jnp.float32)
            if f.ndim == 2:
                h = jnp.concatenate([f, nemb], axis=-1)
                h = nn.silu(nn.Dense(self.width, name=f"b{i}_fc0")(h))
                h = nn.silu(nn.Dense(self.width, name=f"b{i}_fc1")(h))
                logit = nn.Dense(1, name=f"b{i}_out")(h)[:, 0]
                pooled_logits.append(logit)
                local.append(logit[:, None])
                pooled = h
            else:
                h = self._image_branch(f, nemb, i)
                logit_map = nn.Conv(1, (1, 1), name=f"b{i}_out")(h)[..., 0]
                pooled_logits.append(jnp.mean(logit_map, axis=(1, 2)))
                local.append(logit_map.reshape(logit_map.shape[0], -1))
                pooled = jnp.mean(h, axis=(1, 2))
            if self.num_classes > 0:
                b = f.shape[0]
                c = jnp.full((b,), self.num_classes, jnp.int32) if cond is None else cond
                emb = nn.Embed(self.num_classes + 1, self.width, name=f"b{i}_class")(c)
                proj.append(jnp.sum(emb * pooled, axis=-1) / jnp.sqrt(self.width))
            else:
                proj.append(jnp.zeros(f.shape[:1], jnp.float32))
        glob = jnp.mean(jnp.stack(pooled_logits), axis=0)
        return glob, jnp.concatenate(local, axis=1), jnp.mean(jnp.stack(proj), axis=0)


def head_logits(
    head: DiscHead,
    params: dict,
    feats: Sequence[jax.Array],
    noise_label: jax.Array,
    cond: jax.Array | None,
    *,
    local: jax.Array | bool = False,
    conditional: jax.Array | bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Applies a head; returns ``(ratio_logits [B], loss_logits [B, P])``.

    ``ratio_logits`` (global + projection) estimate ``log(p_real / p_fake)`` and feed the
    density ratio. ``loss_logits`` are what the GAN losses see: the patch logits for a
    local head, the global logit (as ``[B, 1]`` broadcast to ``P``) otherwise.
    """
    glob, loc, proj = head.apply({"params": params}, feats, noise_label, cond)
    conditional = jnp.asarray(conditional, jnp.float32)
    ratio = glob + conditional * proj
    loss_logits = jnp.where(jnp.asarray(local), loc + conditional * proj[:, None], ratio[:, None])
    return ratio, loss_logits


__all__ = ["HEAD_FORMS", "DiscHead", "head_logits"]
