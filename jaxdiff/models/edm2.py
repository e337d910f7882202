"""EDM2's magnitude-preserving U-Net (Karras et al., CVPR 2024) in Flax.

The network ``F`` of "Analyzing and Improving the Training Dynamics of Diffusion Models"
(NVlabs/edm2, ``training/networks_edm2.py``, class ``UNet``), plus the ``logvar`` head of
its ``Precond`` used for uncertainty-weighted training. EDM2's ``Precond`` itself is
jaxdiff's :class:`jaxdiff.diffusion.edm.EDM` with ``sigma_data=0.5``: the same ``c_skip``,
``c_out``, ``c_in`` and noise label ``c_noise = ln(sigma) / 4``, so

    D(x, sigma, y) = EDM(sigma_data=0.5).denoise(lambda x_in, c_noise, y: model.apply(...))

reproduces the published denoiser. Structure for ``channel_mult`` of length L:

* embedding: magnitude-preserving Fourier features of ``c_noise`` -> linear; with classes,
  ``mp_sum`` with a linear map of the one-hot label times ``sqrt(num_classes)``; ``mp_silu``;
* encoder: a constant-one channel is appended to the input, a 3x3 conv, then per level a
  downsampling block (levels > 0) and ``num_blocks`` blocks (attention at
  ``attn_resolutions``); every output is kept as a skip;
* decoder: at the lowest resolution two blocks ``in0`` (always with attention: the "middle"
  attention, ``"mid"`` for ``pag_layers``/``skip_layers``) and ``in1``, elsewhere an
  upsampling block; then ``num_blocks + 1`` blocks, each fed ``mp_cat`` of the main path
  and a skip;
* a 3x3 conv scaled by the learned ``out_gain`` (zero at initialisation, so ``F = 0``).

Parameters are named after the PyTorch modules (``enc_64x64_block0/conv_res0/weight`` is
``unet.enc.64x64_block0.conv_res0.weight``), which makes loading published weights a
transpose per tensor (:mod:`jaxdiff.pretrained.edm2`).

Training differences from a plain jaxdiff network:

* forced weight normalisation: apply :func:`force_weight_norm` to the params once after
  ``init`` and after every optimizer update (EDM2 does it in place in the forward pass);
* the Fourier frequencies/phases are fixed: they sit in ``params`` (so loading is exact and
  every ``{"params": ...}`` code path carries them) behind ``stop_gradient``, so Adam never
  moves them; mask them out of weight decay with :func:`trainable_mask`;
* EDM2 trains with the learned uncertainty ``logvar(sigma)``: :func:`uncertainty_loss`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.diffusion.formulation import Formulation, NetFn, expand_to
from jaxdiff.models.edm2_layers import Block, MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize
from jaxdiff.models.layers import check_variant, partitioned

_SIZES = {"xxs": 64, "xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}
_DROPOUT = {"xxs": 0.0, "xs": 0.0, "s": 0.0, "m": 0.1, "l": 0.1, "xl": 0.1, "xxl": 0.1}

EDM2_CONFIGS: dict[str, dict[str, Any]] = {
    f"img{res}-{size}": dict(
        img_resolution=64,
        num_classes=1000,
        model_channels=_SIZES[size],
        channel_mult=(1, 2, 3, 4),
        num_blocks=3,
        attn_resolutions=(16, 8),
        dropout=_DROPOUT[size],
    )
    for res, sizes in ((512, ("xxs", "xs", "s", "m", "l", "xl", "xxl")), (64, tuple(_SIZES)[1:6]))
    for size in sizes
}
"""EDM2UNet kwargs of the ``train_edm2.py`` presets ``edm2-img512-{xxs..xxl}`` (64x64x4
latents) and ``edm2-img64-{xs..xl}`` (64x64x3 pixels), ImageNet's 1000 classes. All sizes
share the UNet defaults (``channel_mult (1, 2, 3, 4)``, 3 blocks, attention at 16 and 8);
only the width and dropout differ."""

EDM2_TRAINING: dict[str, dict[str, float]] = {
    "img512": dict(p_mean=-0.4, p_std=1.0, sigma_data=0.5),
    "img64": dict(p_mean=-0.8, p_std=1.6, sigma_data=0.5),
}
"""EDM formulation fields of EDM2's training presets (log-normal sigma ``P_mean/P_std``)."""

_FOURIER_LEAVES = ("freqs", "phases")


class EDM2UNet(nn.Module):
    """EDM2's magnitude-preserving U-Net on ``[B, H, W, C]`` inputs (see the module docstring).

    Attributes:
      img_resolution: Input height and width (parameter names include it).
      num_classes: Classes (EDM2's ``label_dim``); 0 = unconditional. ``cond`` holds int
        labels, one-hot encoded inside; label ``num_classes`` (jaxdiff's null class) and
        ``cond=None`` give the all-zero label, EDM2's "no class".
      model_channels: Base width.
      channel_mult: Width multiplier per level.
      channel_mult_noise: Fourier features = ``model_channels *`` this (None: level 0 width).
      channel_mult_emb: Embedding width = ``model_channels *`` this (None: widest level).
      num_blocks: Blocks per encoder level (the decoder has one more).
      attn_resolutions: Resolutions (pixels) whose blocks have self-attention.
      label_balance: Blend of noise (0) and class (1) embedding.
      concat_balance: Blend of skip (0) and main path (1) in ``mp_cat``.
      channels_per_head: Channels per attention head.
      dropout: Dropout in the residual branches (``train=True`` only).
      res_balance: Blend of main (0) and residual (1) branch in every block.
      attn_balance: Blend of main (0) and attention (1) branch.
      clip_act: Activation clip of every block (None = no clip).
      resample_filter: FIR taps of the down/upsampling blocks.
      logvar_channels: Fourier features of the ``logvar`` head.
      pag_layers: Attention layers perturbed by ``variant="pag"`` (resolutions or
        ``"mid"``); None = ``("mid",)``.
      skip_layers: Attention layers skipped by ``variant="slg"``; None = ``("mid",)``.
      dtype: Compute dtype (weight normalisation, softmax and Fourier features run in
        float32).
      param_dtype: Parameter dtype.
    """

    img_resolution: int = 64
    num_classes: int = 0
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_noise: int | None = None
    channel_mult_emb: int | None = None
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    label_balance: float = 0.5
    concat_balance: float = 0.5
    channels_per_head: int = 64
    dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256
    resample_filter: tuple[float, ...] = (1, 1)
    logvar_channels: int = 128
    pag_layers: tuple[int | str, ...] | None = None
    skip_layers: tuple[int | str, ...] | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @staticmethod
    def project_params(params: Any) -> Any:
        """The trainer's post-update constraint: :func:`force_weight_norm`."""
        return force_weight_norm(params)

    def _labels(self, cond: jax.Array | None, batch: int) -> jax.Array:
        if cond is None:
            return jnp.zeros((batch, self.num_classes), jnp.float32)
        cond = jnp.asarray(cond)
        if cond.ndim == 2 and cond.shape[-1] == self.num_classes:
            return cond.astype(jnp.float32)  # EDM2's own one-hot (or mixed) label vectors
        # one_hot of an out-of-range id is all zeros: jaxdiff's null class -> EDM2's "none".
        return jax.nn.one_hot(jnp.broadcast_to(cond, (batch,)), self.num_classes)

    def _perturbed(self, variant: str | None) -> tuple[str | None, frozenset]:
        layers = {"pag": self.pag_layers, "slg": self.skip_layers}.get(variant, ())
        chosen = ("mid",) if layers is None else tuple(layers)
        levels = {self.img_resolution >> i for i in range(len(self.channel_mult))}
        allowed = {"mid", *(levels & set(self.attn_resolutions))}
        bad = [k for k in chosen if k not in allowed]
        if bad:
            field = "pag_layers" if variant == "pag" else "skip_layers"
            raise ValueError(f"{field} {bad} name no attention layer; use one of {allowed}")
        return variant, frozenset(chosen)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        noise_label: jax.Array,
        cond: jax.Array | None = None,
        *,
        train: bool = False,
        variant: str | None = None,
        return_logvar: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Predicts the raw network output ``F`` (EDM2's ``unet(x_in, c_noise, labels)``).

        Args:
          x: ``[B, R, R, C]`` preconditioned input ``c_in * x`` (R = ``img_resolution``).
          noise_label: ``[B]`` (or scalar) ``c_noise = ln(sigma) / 4``.
          cond: int ``[B]`` labels, float ``[B, num_classes]`` label vectors, or None.
          train: Enables dropout (rng collection ``"dropout"``).
          variant: Static: None, ``"pag"`` or ``"slg"`` (attention perturbations).
          return_logvar: Also return the uncertainty head ``logvar(sigma)``, ``[B]``.

        Returns:
          ``F`` as ``[B, R, R, C]`` float32, or ``(F, logvar)``.

        Raises:
          ValueError: For a wrong input size, variant or perturbed-layer name.
        """
        check_variant(variant)
        b, height, width, channels = x.shape
        levels = len(self.channel_mult)
        if height != self.img_resolution or width != self.img_resolution:
            raise ValueError(
                f"input is {height}x{width} but the EDM2UNet was built for "
                f"img_resolution={self.img_resolution}"
            )
        perturb, layers = self._perturbed(variant)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(
            channels_per_head=self.channels_per_head,
            dropout=self.dropout,
            res_balance=self.res_balance,
            attn_balance=self.attn_balance,
            clip_act=self.clip_act,
            resample_filter=tuple(self.resample_filter),
            **kw,
        )
        deterministic = not train
        mc = self.model_channels
        cblock = [mc * m for m in self.channel_mult]
        cnoise = cblock[0] if self.channel_mult_noise is None else mc * self.channel_mult_noise
        cemb = max(cblock) if self.channel_mult_emb is None else mc * self.channel_mult_emb

        c_noise = jnp.broadcast_to(jnp.asarray(noise_label, jnp.float32).reshape(-1), (b,))
        emb = MPConv(cemb, (), name="emb_noise", **kw)(
            MPFourier(cnoise, name="emb_fourier")(c_noise)
        )
        if self.num_classes:
            labels = self._labels(cond, b) * math.sqrt(self.num_classes)
            emb = mp_sum(emb, MPConv(cemb, (), name="emb_label", **kw)(labels), self.label_balance)
        emb = mp_silu(emb)

        def block(h, name, features, key=None, **extra):
            p = perturb if key in layers else None
            return Block(features, name=name, **block_kw, **extra)(h, emb, deterministic, p)

        h = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1).astype(self.dtype)
        skips = []
        for level, features in enumerate(cblock):
            res = self.img_resolution >> level
            if level == 0:
                h = MPConv(features, (3, 3), name=f"enc_{res}x{res}_conv", **kw)(h)
            else:
                h = block(h, f"enc_{res}x{res}_down", h.shape[-1], resample_mode="down")
            skips.append(h)
            for i in range(self.num_blocks):
                attn = res in self.attn_resolutions
                h = block(h, f"enc_{res}x{res}_block{i}", features, res, attention=attn)
                skips.append(h)

        for level in reversed(range(levels)):
            res, features = self.img_resolution >> level, cblock[level]
            if level == levels - 1:
                h = block(
                    h, f"dec_{res}x{res}_in0", h.shape[-1], "mid", flavor="dec", attention=True
                )
                h = block(h, f"dec_{res}x{res}_in1", h.shape[-1], flavor="dec")
            else:
                h = block(h, f"dec_{res}x{res}_up", h.shape[-1], flavor="dec", resample_mode="up")
            for i in range(self.num_blocks + 1):
                h = mp_cat(h, skips.pop(), t=self.concat_balance)
                attn = res in self.attn_resolutions
                h = block(
                    h, f"dec_{res}x{res}_block{i}", features, res, flavor="dec", attention=attn
                )

        out_gain = self.param("out_gain", partitioned(nn.initializers.zeros_init(), ()), ())
        out = MPConv(channels, (3, 3), name="out_conv", **kw)(h, gain=out_gain).astype(jnp.float32)
        if not (return_logvar or self.is_initializing()):
            return out
        # The uncertainty head of EDM2's Precond: created at init so the tree is complete.
        fourier = MPFourier(self.logvar_channels, name="logvar_fourier")(c_noise)
        logvar = MPConv(1, (), name="logvar_linear", **kw)(fourier)[:, 0].astype(jnp.float32)
        return (out, logvar) if return_logvar else out


def _is_fourier(path: tuple) -> bool:
    return any(getattr(p, "key", None) in _FOURIER_LEAVES for p in path)


def _is_weight(path: tuple) -> bool:
    return any(getattr(p, "key", None) == "weight" for p in path)


def force_weight_norm(params: Any) -> Any:
    """Projects every MPConv weight back to unit RMS per output channel (EDM2 Eq. 66).

    EDM2 overwrites each stored weight with ``normalize(w)`` in every training forward
    pass; the functional equivalent is to apply this to the params once after ``init`` and
    after every optimizer update (``params = force_weight_norm(optax.apply_updates(...))``).
    The forward pass normalises the weights anyway, so the network's output does not change
    (to float32 rounding and EDM2's ``1e-4`` epsilon); what changes is the weights' scale,
    which keeps the effective learning rate from decaying as the norms grow. Gains and the
    Fourier constants are left alone. Works on boxed or unboxed trees, and under ``jit``.

    Idempotent up to EDM2's epsilon: ``normalize`` divides by ``1e-4 + rms``, whose fixed
    point is an RMS of ``1 - 1e-4``, so applying it again moves a weight by at most 1e-4
    relative and a third time by float32 rounding only (as in EDM2, which reapplies it
    every step).

    Args:
      params: The ``"params"`` tree of an :class:`EDM2UNet`.

    Returns:
      A tree of the same structure with every ``.../weight`` leaf normalised.
    """

    def project(path, w):
        if not _is_weight(path):
            return w
        return normalize(jnp.asarray(w, jnp.float32), tuple(range(w.ndim - 1))).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(project, params)


def trainable_mask(params: Any) -> Any:
    """A bool tree like ``params``: False for the fixed Fourier frequencies and phases.

    For ``optax.masked`` (e.g. weight decay only where True). Adam alone never moves the
    Fourier constants, since their gradient is exactly zero.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: not _is_fourier(path), params)


def uncertainty_loss(
    formulation: Formulation,
    net: NetFn,
    x0: jax.Array,
    key: jax.Array,
    cond: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """EDM2's per-example loss with learned uncertainty (``EDM2Loss``, EDM2 Eq. 21).

    ``loss = lambda(sigma) ||D - x0||^2 / exp(u(sigma)) + u(sigma)`` averaged over pixels,
    where ``lambda = 1 / c_out^2`` is :meth:`Formulation.loss_weight` (for EDM
    ``(sigma^2 + sd^2) / (sigma sd)^2``, as in EDM2) and ``u`` is the ``logvar`` head.
    EDM2 sums over pixels instead of averaging, which multiplies the loss by the pixel
    count; both have the same minimiser.

    Args:
      formulation: Usually ``EDM(sigma_data=0.5, p_mean, p_std)``.
      net: ``net(x_in, c_noise, cond, **kwargs) -> (F, logvar)``, e.g. an ``EDM2UNet``
        applied with ``return_logvar=True``.
      x0: Clean data ``[B, ...]``.
      key: PRNG key for the noise levels and noise.
      cond: Conditioning or None.
      **kwargs: Passed to ``net``.

    Returns:
      ``[B]`` per-example losses.
    """
    k_sigma, k_noise = jax.random.split(key)
    x0 = x0.astype(jnp.float32)
    sigma = formulation.sample_sigma(k_sigma, x0.shape[:1])
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    c = formulation.precondition(sigma)
    x = x0 + expand_to(sigma, x0) * noise
    f, logvar = net(expand_to(c.c_in, x) * x, c.c_noise, cond, **kwargs)
    err = (f.astype(jnp.float32) - formulation.target(x0, noise, sigma)) ** 2
    err = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    return err * jnp.exp(-logvar) + logvar


__all__ = [
    "EDM2_CONFIGS",
    "EDM2_TRAINING",
    "EDM2UNet",
    "force_weight_norm",
    "normalize",
    "trainable_mask",
    "uncertainty_loss",
]
