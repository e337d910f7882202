"""DINOv2 ViT/14 feature extractor (Flax linen) and EDM2's FD-DINOv2 preprocessing.

The network is facebookresearch/dinov2's ``DinoVisionTransformer`` (commit b8931f7) as its
torch hub builds the published ``dinov2_vit{s,b,l}14`` backbones: 14x14 patch embedding
(a stride-14 conv), a CLS token, a learned positional embedding for a 518x518 input (a
37x37 grid), pre-norm blocks (LayerNorm eps 1e-6, multi-head attention with a fused qkv,
LayerScale, an MLP with exact erf GELU, LayerScale), a final LayerNorm; the features are
the normed CLS token (``model(x)`` upstream). No register tokens; the mask token is unused.

For any other input size the positional embedding is resized as upstream's
``interpolate_pos_encoding`` does: ``F.interpolate(mode="bicubic", antialias=False,
scale_factor=((h0 + 0.1) / 37, (w0 + 0.1) / 37))`` on the 37x37 grid, i.e. torch's
bicubic with A = -0.75, half-pixel centres and clamped edges, with source coordinates
``(i + 0.5) * 37 / (h0 + 0.1) - 0.5`` (the 0.1 "offset" kludge is reproduced).

Preprocessing (:func:`preprocess`) is EDM2's ``DINOv2Detector`` in its default
``resize_mode="torch"``: uint8 images as float32, ``F.interpolate(size=(224, 224),
mode="bicubic", antialias=True)`` (torch's antialiased path: the PIL-style cubic with
a = -0.5, support widened by the scale when shrinking, weights renormalised at the edges;
no clamping or rounding of the result), then ``/ 255``, minus ImageNet mean
(0.485, 0.456, 0.406), over ImageNet std (0.229, 0.224, 0.225). All resampling is done
with small constant matrices computed in numpy, so it is exact and jittable.

Weights: convert the published ``dinov2_vitl14_pretrain.pth`` once with
``python -m jaxdiff.metrics.convert_dinov2`` (no torch needed) and load the result with
:func:`load_dinov2_params`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.pretrained.weights_io import WeightsError, read_weights
from jaxdiff.utils.trees import unflatten_tree

INPUT_SIZE = 224
"""Side EDM2 resizes images to before the network."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMAT = "jaxdiff.dinov2.v1"
"""``jaxdiff.format`` metadata of a converted DINOv2 file."""


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
    """Architecture of a DINOv2 ViT (hub defaults: patch 14, native 518x518 input).

    Attributes:
      embed_dim: Token width (also the feature width).
      depth: Number of blocks.
      num_heads: Attention heads.
      mlp_ratio: MLP hidden width over ``embed_dim``.
      patch_size: Patch side.
      img_size: Native input side; the positional embedding has ``(img_size //
        patch_size) ** 2 + 1`` entries.
      interpolate_offset: Upstream's offset added to the target grid in the positional
        embedding's scale factor.
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    img_size: int = 518
    interpolate_offset: float = 0.1

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} must be a multiple of num_heads {self.num_heads}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of {self.patch_size}")

    @property
    def grid(self) -> int:
        """Side of the native patch grid (37 for the published models)."""
        return self.img_size // self.patch_size


PRESETS: dict[str, DINOv2Config] = {
    "vits14": DINOv2Config(embed_dim=384, depth=12, num_heads=6),
    "vitb14": DINOv2Config(embed_dim=768, depth=12, num_heads=12),
    "vitl14": DINOv2Config(embed_dim=1024, depth=24, num_heads=16),
}
"""The published plain (MLP, no register) backbones; ``vitl14`` is EDM2's FD-DINOv2 net."""


def get_config(arch: str) -> DINOv2Config:
    """The preset named ``arch`` (``"vits14"``, ``"vitb14"`` or ``"vitl14"``)."""
    if arch not in PRESETS:
        raise ValueError(f"unknown DINOv2 arch {arch!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[arch]


_F32 = np.float32


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic kernel, in float32 op by op as torch evaluates it for float32 images."""
    x, a = np.abs(x).astype(_F32), _F32(a)
    near = ((a + _F32(2)) * x - (a + _F32(3))) * x * x + _F32(1)
    far = (((x - _F32(5)) * x + _F32(8)) * x - _F32(4)) * a
    return np.where(x < 1, near, np.where(x < 2, far, _F32(0))).astype(_F32)


@functools.lru_cache(maxsize=64)
def cubic_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
    """``[out, in]`` weights of torch's ``F.interpolate(mode="bicubic", scale_factor=...)``.

    ``antialias=False``, ``align_corners=False``. Torch computes in float32 (for float32
    data): the step ``float32(1 / scale_factor)``, the source coordinate
    ``step * (i + 0.5) - 0.5`` and the A = -0.75 cubic weights of its four taps, taps
    outside the input clamped to its edge. Reproducing that rounding keeps the match to
    ~1e-6 rather than ~1e-5.

    Args:
      in_size: Input length.
      out_size: Output length.
      scale_factor: Output step per input step, as passed to ``F.interpolate``.

    Returns:
      float32 weights.
    """
    step = _F32(1.0 / scale_factor)
    src = step * (np.arange(out_size).astype(_F32) + _F32(0.5)) - _F32(0.5)
    base = np.floor(src)
    t = (src - base).astype(_F32)
    a, one, two = _F32(-0.75), _F32(1), _F32(2)
    far = lambda x: ((a * x - _F32(5) * a) * x + _F32(8) * a) * x - _F32(4) * a  # noqa: E731
    near = lambda x: ((a + two) * x - (a + _F32(3))) * x * x + one  # noqa: E731
    taps = (far(t + one), near(t), near(one - t), far(two - t))
    mat = np.zeros((out_size, in_size), _F32)
    rows = np.arange(out_size)
    for k, w in zip((-1, 0, 1, 2), taps, strict=True):
        idx = np.clip(base + k, 0, in_size - 1).astype(np.int64)
        np.add.at(mat, (rows, idx), w.astype(_F32))
    return mat


@functools.lru_cache(maxsize=64)
def cubic_antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` weights of torch's ``F.interpolate(size=..., mode="bicubic", antialias=True)``.

    Torch's antialiased kernels (taken from PIL): the cubic with a = -0.5, stretched by the
    scale ``in / out`` when shrinking (support ``2 * scale``), only taps inside the input,
    weights divided by their sum; all in float32, as torch computes them.
    """
    scale = _F32(in_size) / _F32(out_size)
    support = _F32(2) * scale if scale >= 1 else _F32(2)
    inv = _F32(1) / scale if scale >= 1 else _F32(1)
    mat = np.zeros((out_size, in_size), _F32)
    for i in range(out_size):
        center = scale * (_F32(i) + _F32(0.5))
        lo = max(int(center - support + _F32(0.5)), 0)
        hi = min(int(center + support + _F32(0.5)), in_size)
        w = _keys_cubic((np.arange(lo, hi).astype(_F32) - center + _F32(0.5)) * inv, -0.5)
        total = _F32(0)
        for v in w:  # torch's running float32 sum
            total = _F32(total + v)
        mat[i, lo:hi] = w / total if total != 0 else w
    return mat


def _resize2d(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """Applies separable ``[out, in]`` weights to axes 1 and 2 of ``[B, H, W, C]``."""
    hi = jax.lax.Precision.HIGHEST  # a resize is exact arithmetic, never a bf16 pass
    x = jnp.einsum("bhwc,vw->bhvc", x, jnp.asarray(cols, jnp.float32), precision=hi)
    return jnp.einsum("bhwc,uh->buwc", x, jnp.asarray(rows, jnp.float32), precision=hi)


def interpolate_pos_embed(
    pos_embed: jax.Array, grid_h: int, grid_w: int, offset: float = 0.1
) -> jax.Array:
    """Upstream ``interpolate_pos_encoding``: ``[1, 1 + M*M, D]`` -> ``[1, 1 + h*w, D]``.

    Returned unchanged for the native square grid, as upstream does.

    Args:
      pos_embed: CLS entry then the row-major ``M x M`` grid.
      grid_h: Target grid rows.
      grid_w: Target grid columns.
      offset: Upstream's ``interpolate_offset``.
    """
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"pos_embed holds {n} patch entries, not a square grid")
    if grid_h == grid_w == m:
        return pos_embed
    grid = pos_embed[:, 1:].astype(jnp.float32).reshape(1, m, m, -1)
    # Upstream passes scale factors (in double), not sizes: ((h0 + offset) / M, ...).
    rows = cubic_matrix(m, grid_h, float(grid_h + offset) / m)
    cols = cubic_matrix(m, grid_w, float(grid_w + offset) / m)
    grid = _resize2d(grid, rows, cols).reshape(1, grid_h * grid_w, -1)
    return jnp.concatenate([pos_embed[:, :1].astype(jnp.float32), grid], axis=1)


class _Block(nn.Module):
    """Pre-norm ViT block with LayerScale (upstream ``NestedTensorBlock``, inference)."""

    config: DINOv2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to ``[B, N, D]`` tokens."""
        cfg = self.config
        b, n, d = x.shape
        heads, hd = cfg.num_heads, d // cfg.num_heads
        h = nn.LayerNorm(epsilon=1e-6, name="norm1")(x)
        qkv = nn.Dense(3 * d, name="qkv")(h).reshape(b, n, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        h = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        h = nn.Dense(d, name="proj")(h)
        x = x + h * self.param("ls1", nn.initializers.ones, (d,))
        h = nn.LayerNorm(epsilon=1e-6, name="norm2")(x)
        h = nn.Dense(int(d * cfg.mlp_ratio), name="fc1")(h)
        h = nn.Dense(d, name="fc2")(nn.gelu(h, approximate=False))
        return x + h * self.param("ls2", nn.initializers.ones, (d,))


class DINOv2ViT(nn.Module):
    """DINOv2 ViT: normalised ``[B, H, W, 3]`` images -> ``[B, embed_dim]`` normed CLS token.

    ``H`` and ``W`` must be multiples of the patch size.

    Attributes:
      config: The architecture (see :data:`PRESETS`).
    """

    config: DINOv2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Runs the network on ImageNet-normalised NHWC images."""
        cfg = self.config
        p, d = cfg.patch_size, cfg.embed_dim
        if x.ndim != 4 or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(
                f"input must be [B, H, W, C] with H, W multiples of {p}, got {x.shape}"
            )
        b, gh, gw = x.shape[0], x.shape[1] // p, x.shape[2] // p
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(x)
        x = x.reshape(b, gh * gw, d)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
        pos = self.param("pos_embed", nn.initializers.zeros, (1, cfg.grid**2 + 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        x = x + interpolate_pos_embed(pos, gh, gw, cfg.interpolate_offset).astype(x.dtype)
        for i in range(cfg.depth):
            x = _Block(cfg, name=f"blocks_{i}")(x)
        return nn.LayerNorm(epsilon=1e-6, name="norm")(x[:, 0])


def preprocess(
    images: jax.Array,
    *,
    input_range: str = "uint8",
    quantize: bool = True,
    size: int | tuple[int, int] = INPUT_SIZE,
) -> jax.Array:
    """EDM2's ``DINOv2Detector`` input pipeline: bicubic-antialias resize, ImageNet norm.

    Args:
      images: ``[B, H, W, C]``, C in {1, 3} (grayscale is repeated to RGB).
      input_range: ``"uint8"``: values 0..255 (any dtype), as EDM2 feeds; or
        ``"minus_one_one"``: floats in [-1, 1] (jaxdiff samples), clipped and mapped to
        0..255.
      quantize: For ``"minus_one_one"``, round to the 256 levels of an 8-bit image (what
        EDM2 evaluates: it saves and reads uint8 images).
      size: Output side or ``(height, width)``; 224 for FD-DINOv2 (others for tests).

    Returns:
      ``[B, h, w, 3]`` float32, ImageNet-normalised.
    """
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [B, H, W, 1 or 3], got {x.shape}")
    if input_range == "uint8":
        x = x.astype(jnp.float32)
    elif input_range == "minus_one_one":
        x = (jnp.clip(x.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5
        if quantize:
            x = jnp.round(x)
    else:
        raise ValueError(f"input_range must be 'uint8' or 'minus_one_one', got {input_range!r}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    rows = cubic_antialias_matrix(x.shape[1], h)
    cols = cubic_antialias_matrix(x.shape[2], w)
    x = _resize2d(x, rows, cols) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def dinov2_features(
    params: Any,
    images: jax.Array,
    *,
    config: DINOv2Config | str = "vitl14",
    input_range: str = "uint8",
    quantize: bool = True,
    size: int | tuple[int, int] = INPUT_SIZE,
) -> jax.Array:
    """FD-DINOv2 features of raw images: :func:`preprocess` then :class:`DINOv2ViT`.

    Pure and jittable (``config`` static); shard ``images`` over the batch.

    Args:
      params: The network's ``params`` tree (see :func:`load_dinov2_params`).
      images: ``[B, H, W, C]`` images, see :func:`preprocess`.
      config: A :class:`DINOv2Config` or preset name; EDM2 uses ``"vitl14"``.
      input_range: See :func:`preprocess`.
      quantize: See :func:`preprocess`.
      size: See :func:`preprocess`.

    Returns:
      ``[B, embed_dim]`` float32 features (1024 for ViT-L/14).
    """
    cfg = get_config(config) if isinstance(config, str) else config
    x = preprocess(images, input_range=input_range, quantize=quantize, size=size)
    return DINOv2ViT(cfg).apply({"params": params}, x)


def param_shapes(config: DINOv2Config) -> dict[str, Any]:
    """The ``params`` tree of shapes (``jax.ShapeDtypeStruct``), via ``jax.eval_shape``."""
    model = DINOv2ViT(config)
    x = jnp.zeros((1, config.patch_size, config.patch_size, 3))
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def load_dinov2_params(path: str | os.PathLike) -> tuple[dict[str, Any], DINOv2Config]:
    """Loads a file written by :mod:`jaxdiff.metrics.convert_dinov2`.

    Returns:
      ``(params, config)``.

    Raises:
      WeightsError: If the file is not a converted DINOv2 file or its tensors do not match
        its config.
    """
    tensors, meta = read_weights(path)
    if meta.get("jaxdiff.format") != FORMAT:
        raise WeightsError(
            f"{path}: not a converted DINOv2 file (format {meta.get('jaxdiff.format')!r}); "
            "make one with `python -m jaxdiff.metrics.convert_dinov2 --src X.pth --dst Y`"
        )
    config = DINOv2Config(**json.loads(meta["jaxdiff.config"]))
    expected = {
        "/".join(str(getattr(k, "key", k)) for k in key): tuple(leaf.shape)
        for key, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]
    }
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        bad = sorted(set(got.items()) ^ set(expected.items()))[:4]
        raise WeightsError(f"{path}: tensors do not match its config {config}: e.g. {bad}")
    return unflatten_tree({k: np.asarray(v, np.float32) for k, v in tensors.items()}), config


__all__ = [
    "FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INPUT_SIZE",
    "PRESETS",
    "DINOv2Config",
    "DINOv2ViT",
    "cubic_antialias_matrix",
    "cubic_matrix",
    "dinov2_features",
    "get_config",
    "interpolate_pos_embed",
    "load_dinov2_params",
    "param_shapes",
    "preprocess",
]
