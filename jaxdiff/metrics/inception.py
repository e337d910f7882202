"""The FID Inception-v3 network (pool3, 2048-d) in Flax linen, with weights from a file.

This is the network every published FID number uses: TensorFlow's 2015-12-05 Inception
graph as ported by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``), including the
FID-specific quirks that differ from torchvision's Inception-v3:

* ``Mixed_5b/5c/5d`` (FIDInceptionA), ``Mixed_6b..6e`` (FIDInceptionC) and ``Mixed_7b``
  (FIDInceptionE_1) average-pool their pool branch with ``count_include_pad=False``
  (TensorFlow ignores the zero padding when averaging);
* ``Mixed_7c`` (FIDInceptionE_2) max-pools its pool branch instead of averaging;
* every conv is bias-free and followed by inference-mode BatchNorm (eps 1e-3) and ReLU;
* the features are the global average pool of ``Mixed_7c``: ``[B, 2048]``.

Input (see :func:`preprocess`): images are resized to 299x299 with bilinear
interpolation, half-pixel centres and no antialiasing (``F.interpolate(...,
mode="bilinear", align_corners=False)``, as pytorch-fid does), and fed in [-1, 1].
Float images in [-1, 1] (jaxdiff's sample range) are by default first quantised to the
256 levels of an 8-bit image, as if saved to PNG and read back, which is what reference
pipelines evaluate; ``uint8`` images in [0, 255] are mapped by ``u / 127.5 - 1``.
Grayscale images are repeated to 3 channels.

Weights are never downloaded. They come from a local ``.npz`` made once by
``python -m jaxdiff.metrics.convert_inception`` (see that module), found through the
``path`` argument or the ``JAXDIFF_INCEPTION_WEIGHTS`` environment variable.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.metrics.weights import (
    flatten_tree,
    load_arrays,
    save_arrays,
    unflatten_tree,
    verify_sha256,
)

INCEPTION_WEIGHTS_ENV = "JAXDIFF_INCEPTION_WEIGHTS"
"""Environment variable naming the converted Inception ``.npz``."""

INCEPTION_SHA256: str | None = None
"""SHA-256 of the ``.npz`` that ``convert_inception`` writes from pytorch-fid's ``.pth``.

The conversion is deterministic (same ``.pth`` -> byte-identical ``.npz``), so this value
is well defined, but it is **not pinned yet**: neither PyTorch nor the ``.pth`` was
available where this code was written, so the hash could not be computed. While it is
None the loader checks the file against the ``<file>.sha256`` the converter writes beside
it (catching corruption and truncation, not provenance) and always checks every
parameter's name and shape. Once someone converts the official file, paste the printed
hash here; until then pass ``expected_sha256=`` to pin it yourself.
"""

FEATURE_DIM = 2048
"""Width of the pool3 features."""

INPUT_SIZE = 299
"""Side of the network's input images."""

PTH_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
PTH_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PTH_FILENAME

_DEFAULT = object()


class InceptionWeightsNotFoundError(FileNotFoundError):
    """No converted Inception weights file was given or found."""


def _how_to_get_weights(reason: str) -> str:
    return (
        f"{reason}. FID needs the standard FID Inception weights, converted once to .npz:\n"
        f"  1. download {PTH_FILENAME} from {PTH_URL}\n"
        "  2. pip install torch  (only the converter needs it)\n"
        f"  3. python -m jaxdiff.metrics.convert_inception --pth=/path/to/{PTH_FILENAME} "
        "--out=/path/to/fid_inception.npz\n"
        f"  4. export {INCEPTION_WEIGHTS_ENV}=/path/to/fid_inception.npz  "
        "(or pass inception_weights=/path/to/fid_inception.npz)\n"
        "Without weights, use the offline evaluator 'fd_digits' (FD-digits, not FID)."
    )


def _pool_same(x: jax.Array, kind: str) -> jax.Array:
    """3x3, stride 1, padding 1 pooling; average excludes the padding (TF semantics)."""
    pad = ((1, 1), (1, 1))
    if kind == "max":
        return nn.max_pool(x, (3, 3), strides=(1, 1), padding=pad)
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=pad, count_include_pad=False)


def _max_pool_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class BasicConv(nn.Module):
    """Bias-free conv, inference BatchNorm (eps 1e-3), ReLU: torchvision's BasicConv2d.

    Attributes:
      features: Output channels.
      kernel: ``(kh, kw)``.
      stride: Stride in both directions.
      padding: Symmetric ``(ph, pw)`` zero padding.
      dtype: Compute dtype.
    """

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to ``[B, H, W, C]``."""
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


class InceptionA(nn.Module):
    """FIDInceptionA (``Mixed_5b..5d``): 1x1, 5x5, double 3x3 and avg-pool branches.

    Attributes:
      pool_features: Channels of the pool branch.
      dtype: Compute dtype.
    """

    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        c = functools.partial(BasicConv, dtype=self.dtype)
        b1 = c(64, name="branch1x1")(x)
        b5 = c(48, name="branch5x5_1")(x)
        b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = c(64, name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, name="branch_pool")(_pool_same(x, "avg"))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """InceptionB (``Mixed_6a``): stride-2 reduction 35x35 -> 17x17.

    Attributes:
      dtype: Compute dtype.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        c = functools.partial(BasicConv, dtype=self.dtype)
        b3 = c(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = c(64, name="branch3x3dbl_1")(x)
        bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = c(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC (``Mixed_6b..6e``): factorised 7x7 branches and avg-pool branch.

    Attributes:
      channels_7x7: Width inside the 7x7 branches.
      dtype: Compute dtype.
    """

    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        c = functools.partial(BasicConv, dtype=self.dtype)
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = c(192, name="branch1x1")(x)
        b7 = c(c7, name="branch7x7_1")(x)
        b7 = c(c7, **row, name="branch7x7_2")(b7)
        b7 = c(192, **col, name="branch7x7_3")(b7)
        bd = c(c7, name="branch7x7dbl_1")(x)
        bd = c(c7, **col, name="branch7x7dbl_2")(bd)
        bd = c(c7, **row, name="branch7x7dbl_3")(bd)
        bd = c(c7, **col, name="branch7x7dbl_4")(bd)
        bd = c(192, **row, name="branch7x7dbl_5")(bd)
        bp = c(192, name="branch_pool")(_pool_same(x, "avg"))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """InceptionD (``Mixed_7a``): stride-2 reduction 17x17 -> 8x8.

    Attributes:
      dtype: Compute dtype.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        c = functools.partial(BasicConv, dtype=self.dtype)
        b3 = c(192, name="branch3x3_1")(x)
        b3 = c(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = c(192, name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (``pool="avg"``, ``Mixed_7b``) / E_2 (``pool="max"``, ``Mixed_7c``).

    Attributes:
      pool: ``"avg"`` (padding excluded) or ``"max"`` for the pool branch.
      dtype: Compute dtype.
    """

    pool: str = "avg"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        c = functools.partial(BasicConv, dtype=self.dtype)
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = c(320, name="branch1x1")(x)
        b3 = c(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [c(384, **row, name="branch3x3_2a")(b3), c(384, **col, name="branch3x3_2b")(b3)],
            axis=-1,
        )
        bd = c(448, name="branch3x3dbl_1")(x)
        bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [c(384, **row, name="branch3x3dbl_3a")(bd), c(384, **col, name="branch3x3dbl_3b")(bd)],
            axis=-1,
        )
        bp = c(192, name="branch_pool")(_pool_same(x, self.pool))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 up to the pool3 features.

    Submodule names follow pytorch-fid / torchvision (``Conv2d_1a_3x3``, ``Mixed_5b``,
    ``branch1x1``, ``conv``, ``bn``...), so converted weights map one to one. Variables:
    ``params`` (conv ``kernel``, BN ``scale``/``bias``) and ``batch_stats`` (BN
    ``mean``/``var``); inference only.

    Attributes:
      dtype: Compute dtype (float32 for reference-comparable numbers).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Computes pool3 features.

        Args:
          x: ``[B, H, W, 3]`` images already in [-1, 1] and resized (see
            :func:`preprocess`); H, W >= 75.

        Returns:
          ``[B, 2048]`` float32 features.
        """
        c = functools.partial(BasicConv, dtype=self.dtype)
        kw = dict(dtype=self.dtype)
        x = x.astype(self.dtype)
        x = c(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_s2(x)
        x = c(80, name="Conv2d_3b_1x1")(x)
        x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_s2(x)
        x = InceptionA(32, name="Mixed_5b", **kw)(x)
        x = InceptionA(64, name="Mixed_5c", **kw)(x)
        x = InceptionA(64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(c7, name=name, **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE("avg", name="Mixed_7b", **kw)(x)
        x = InceptionE("max", name="Mixed_7c", **kw)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def preprocess(
    images: jax.Array,
    *,
    input_range: str = "minus_one_one",
    quantize: bool = True,
    size: int = INPUT_SIZE,
) -> jax.Array:
    """Maps images to the network input: 3 channels, ``size`` x ``size``, [-1, 1].

    Args:
      images: ``[B, H, W, C]`` with C in {1, 3}.
      input_range: ``"minus_one_one"``: floats in [-1, 1] (jaxdiff samples), clipped;
        ``"uint8"``: values 0..255 (any dtype), mapped by ``u / 127.5 - 1``.
      quantize: For ``"minus_one_one"``, round to the 256 levels of an 8-bit image first
        (``round((x + 1) * 127.5)``), matching a PNG round trip as in reference tools.
      size: Output side (299 for FID; smaller only for tests).

    Returns:
      ``[B, size, size, 3]`` float32.

    Raises:
      ValueError: For an unknown ``input_range`` or channel count.
    """
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [B, H, W, 1 or 3], got {x.shape}")
    if input_range == "uint8":
        x = x.astype(jnp.float32) / 127.5 - 1.0
    elif input_range == "minus_one_one":
        x = jnp.clip(x.astype(jnp.float32), -1.0, 1.0)
        if quantize:
            x = jnp.round((x + 1.0) * 127.5) / 127.5 - 1.0
    else:
        raise ValueError(f"input_range must be 'minus_one_one' or 'uint8', got {input_range!r}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
    return x


def inception_features(
    variables: Any,
    images: jax.Array,
    *,
    input_range: str = "minus_one_one",
    quantize: bool = True,
    size: int = INPUT_SIZE,
) -> jax.Array:
    """Pool3 features of raw images: :func:`preprocess` then :class:`InceptionV3`.

    Pure and jittable; shard ``images`` over the batch axes for sharded evaluation.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` (see
        :func:`load_inception_variables`).
      images: ``[B, H, W, C]`` images, see :func:`preprocess`.
      input_range: See :func:`preprocess`.
      quantize: See :func:`preprocess`.
      size: See :func:`preprocess`.

    Returns:
      ``[B, 2048]`` float32 features.
    """
    x = preprocess(images, input_range=input_range, quantize=quantize, size=size)
    return InceptionV3().apply(variables, x)


@functools.cache
def inception_variable_shapes() -> dict[str, tuple[int, ...]]:
    """Flat ``{"params/Mixed_5b/...": shape}`` of every variable (no compute, no RNG)."""
    shapes = jax.eval_shape(
        InceptionV3().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
    )
    return {
        "/".join(str(k.key) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
    }


def random_inception_variables(seed: int = 0) -> dict[str, Any]:
    """He-normal conv kernels and identity BatchNorm: a stand-in for tests and timing.

    Built with numpy (no JAX RNG compile). Its features are NOT meaningful for FID.

    Args:
      seed: numpy seed.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 arrays.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in sorted(inception_variable_shapes().items()):
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            flat[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif leaf in ("scale", "var"):
            flat[name] = np.ones(shape, np.float32)
        else:
            flat[name] = np.zeros(shape, np.float32)
    return unflatten_tree(flat)


def save_inception_variables(path: str | os.PathLike, variables: Any) -> str:
    """Writes Inception variables to a deterministic ``.npz`` plus ``<path>.sha256``.

    Args:
      path: Output file.
      variables: ``{"params": ..., "batch_stats": ...}``.

    Returns:
      The file's SHA-256 (also written to ``<path>.sha256``).

    Raises:
      ValueError: If a variable is missing, extra or of the wrong shape.
    """
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_tree(variables).items()}
    _check_names_and_shapes(flat, path)
    digest = save_arrays(path, flat)
    Path(f"{os.fspath(path)}.sha256").write_text(f"{digest}  {Path(path).name}\n")
    return digest


def resolve_weights_path(path: str | os.PathLike | None = None) -> Path:
    """Finds the converted weights: ``path``, else ``$JAXDIFF_INCEPTION_WEIGHTS``.

    Raises:
      InceptionWeightsNotFoundError: Saying where to get and how to convert the weights.
    """
    if path is None:
        path = os.environ.get(INCEPTION_WEIGHTS_ENV) or None
        if path is None:
            raise InceptionWeightsNotFoundError(
                _how_to_get_weights(
                    f"no Inception weights given and ${INCEPTION_WEIGHTS_ENV} is unset"
                )
            )
    path = Path(path).expanduser()
    if not path.is_file():
        raise InceptionWeightsNotFoundError(
            _how_to_get_weights(f"Inception weights file {os.fspath(path)!r} does not exist")
        )
    return path


def load_inception_variables(
    path: str | os.PathLike | None = None, *, expected_sha256: Any = _DEFAULT
) -> dict[str, Any]:
    """Loads converted FID Inception weights, checking checksum, names and shapes.

    Args:
      path: The ``.npz`` from ``convert_inception``; None reads
        ``$JAXDIFF_INCEPTION_WEIGHTS``.
      expected_sha256: Hex SHA-256 the file must have. Default: :data:`INCEPTION_SHA256`
        if pinned, else the digest in ``<path>.sha256`` if that file exists. None skips
        the checksum (names and shapes are still checked).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays.

    Raises:
      InceptionWeightsNotFoundError: No file; the message says how to make one.
      ChecksumMismatchError: Naming the path and both digests.
      ValueError: If a variable is missing, extra or of the wrong shape.
    """
    path = resolve_weights_path(path)
    if expected_sha256 is _DEFAULT:
        expected_sha256 = INCEPTION_SHA256
        sidecar = Path(f"{os.fspath(path)}.sha256")
        if expected_sha256 is None and sidecar.is_file():
            expected_sha256 = sidecar.read_text().split()[0]
    verify_sha256(path, expected_sha256, what="Inception weights file")
    flat = load_arrays(path, what="Inception weights file")
    _check_names_and_shapes(flat, path)
    return unflatten_tree({k: v.astype(np.float32) for k, v in flat.items()})


def _check_names_and_shapes(flat: dict[str, np.ndarray], path: Any) -> None:
    want = inception_variable_shapes()
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    wrong = sorted(k for k in set(want) & set(flat) if tuple(flat[k].shape) != want[k])
    if missing or extra or wrong:
        detail = "; ".join(
            f"{label}: {names[:5]}{' ...' if len(names) > 5 else ''}"
            for label, names in (("missing", missing), ("unexpected", extra), ("bad shape", wrong))
            if names
        )
        raise ValueError(
            f"{os.fspath(path)!r} is not a converted FID Inception file ({detail}); "
            "re-create it with `python -m jaxdiff.metrics.convert_inception`"
        )


__all__ = [
    "FEATURE_DIM",
    "INCEPTION_SHA256",
    "INCEPTION_WEIGHTS_ENV",
    "INPUT_SIZE",
    "InceptionV3",
    "InceptionWeightsNotFoundError",
    "inception_features",
    "inception_variable_shapes",
    "load_inception_variables",
    "preprocess",
    "random_inception_variables",
    "resolve_weights_path",
    "save_inception_variables",
]
