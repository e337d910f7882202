"""Host-side image augmentations whose every random choice comes from a per-example key.

Protocol: an augmentation is a picklable callable ``augment(batch, keys) -> batch`` run on
the host (possibly in grain worker processes). ``batch["image"]`` is float32
``[B, H, W, C]`` in [-1, 1] and ``keys`` is an integer array ``[B]`` of per-example seeds
derived from each example's global position, so example ``i``'s result depends on
``keys[i]`` and its own image only: never on the batch size, its neighbours, the process
count or the worker that ran it.

* :func:`random_flip`: left-right flip with probability 1/2 (a plain dataset flip; the
  network is not told about it, which is fine because mirrored images are in-distribution).
* :class:`EdmAugment`: the non-leaking geometric augmentation pipeline of EDM (Karras et
  al. 2022, appendix; NVlabs/edm ``training/augment.py``). The network must be
  conditioned on the returned ``"augment_label"`` (``UNet(augment_dim=...)``) and is
  sampled with zero labels, i.e. "not augmented", so augmentations never leak into samples.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

AUGMENT_LABEL = "augment_label"
"""Batch key of the float32 ``[B, label_dim]`` augmentation labels of :class:`EdmAugment`."""

# Salts keep the streams of different augmentations apart when they are fed the same keys:
# without them a flip and an EdmAugment chained on one batch would make correlated choices.
_FLIP_SALT = 0x6A09E667F3BCC908
_EDM_SALT = 0x3C6EF372FE94F82B

_U64 = np.uint64


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixed hash of each uint64.

    The one hash behind augmentation keys (:func:`jaxdiff.data.pipeline.augment_keys`)
    and the choices made from them here.
    """
    # uint64 arithmetic wraps by design; 0-d inputs would otherwise warn on overflow.
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def _check_inputs(batch: dict[str, np.ndarray], keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if "image" not in batch:
        raise ValueError(f"batch has no 'image' entry (keys: {sorted(batch)}); pass a batch dict")
    image = np.asarray(batch["image"])
    if image.ndim != 4:
        raise ValueError(
            f"batch['image'] must be [B, H, W, C] images, got shape {image.shape}; "
            "augmentations apply to image datasets only"
        )
    keys = np.asarray(keys)
    if keys.shape != image.shape[:1] or not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(
            f"keys must be an integer array of shape {image.shape[:1]} (one seed per example), "
            f"got {keys.dtype} {keys.shape}"
        )
    return image, keys.astype(np.uint64)


def random_flip(batch: dict[str, np.ndarray], keys: np.ndarray) -> dict[str, np.ndarray]:
    """Mirrors each image left-right with probability 1/2, decided by its key alone.

    The decision is the top bit of a SplitMix64 hash of ``keys[i]`` (vectorised; no
    generator is built per example).

    Args:
        batch: Batch whose ``"image"`` is ``[B, H, W, C]``; other entries pass through.
        keys: Integer ``[B]`` per-example seeds.

    Returns:
        A new batch dict with some images mirrored along the width axis.

    Raises:
        ValueError: If the image is not rank 4 or ``keys`` is not an integer ``[B]`` array.
    """
    image, keys = _check_inputs(batch, keys)
    flip = (mix64(keys ^ _U64(_FLIP_SALT)) >> _U64(63)).astype(bool)
    return {**batch, "image": np.where(flip[:, None, None, None], image[:, :, ::-1], image)}


def _rotate(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _scale(sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0])


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _reflect_index(i: np.ndarray, n: int) -> np.ndarray:
    """Folds indices into ``[0, n)`` by mirroring without repeating the edge pixel."""
    if n == 1:
        return np.zeros_like(i)
    return n - 1 - np.abs(n - 1 - np.mod(i, 2 * n - 2))


def translate_int(image: np.ndarray, tx: int, ty: int) -> np.ndarray:
    """EDM's integer translation of one ``[H, W, C]`` image with reflect padding.

    Output pixel ``(y, x)`` reads input ``(y + ty, x - tx)`` mirrored at the borders (the
    edge pixel is not repeated, as ``np.pad(mode="reflect")``). The opposite signs of the
    two axes are EDM's (and StyleGAN2-ADA's) convention, kept so labels mean the same.
    """
    h, w = image.shape[:2]
    rows = _reflect_index(np.arange(h) + ty, h)
    cols = _reflect_index(np.arange(w) - tx, w)
    return image[rows[:, None], cols[None, :]]


def resample(image: np.ndarray, g_inv: np.ndarray, order: int = 3) -> np.ndarray:
    """Resamples one ``[H, W, C]`` image through an inverse affine map.

    ``g_inv`` (3x3) maps output to input coordinates measured in pixels from the image
    centre, x to the right and y down (EDM's convention). Samples are B-spline
    interpolated (``scipy.ndimage.affine_transform``, cubic by default) with mirror
    padding (torch's ``"reflect"``); values are not clipped, so they may overshoot
    [-1, 1] slightly near edges, as EDM's do.

    Where this differs from EDM: EDM upsamples 2x with the sym6 wavelet filter, samples
    bilinearly and filters back down, which also anti-aliases shrinking; a cubic spline
    does not, but EDM's shrinking is mild (95% of scales within 2^(+-0.4)), so aliasing
    stays small. EDM's reflected margin is finite (zeros beyond about one image size);
    mirroring here is unbounded, which only matters for pixels mapped that far out. Both
    are harmless for the same reason: the network is told each transform through its
    labels and is sampled with zero labels (no transform), so resampling artefacts shape
    only the augmented distributions, which are never generated.
    """
    h, w = image.shape[:2]
    # (x, y) -> (row, col) order: swap both the rows and columns of the linear part.
    matrix = g_inv[:2, :2][::-1, ::-1]
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = centre + g_inv[1::-1, 2] - matrix @ centre
    from scipy import ndimage  # noqa: PLC0415 - scipy is heavy; only resampling needs it

    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[2]):
        out[..., c] = ndimage.affine_transform(
            image[..., c].astype(np.float64), matrix, offset=offset, order=order, mode="mirror"
        )
    return out


_LABEL_NAMES = {
    "xflip": ("xflip",),
    "yflip": ("yflip",),
    "rotate_int": ("rotate_int_x", "rotate_int_y"),
    "translate_int": ("translate_int_x", "translate_int_y"),
    "scale": ("scale",),
    "rotate_frac": ("rotate_cos_minus_1", "rotate_sin"),
    "aniso": ("aniso_cos", "aniso_sin"),
    "translate_frac": ("translate_frac_x", "translate_frac_y"),
}


@dataclasses.dataclass(frozen=True)
class EdmAugment:
    """EDM's non-leaking geometric augmentation (``AugmentPipe``), per example on the host.

    Defaults are EDM's CIFAR-10 recipe (``--augment=0.12``): x-flip always drawn (its
    multiplier 1e8 makes ``p * xflip >= 1``, so half the images are mirrored), y-flip,
    isotropic scaling, arbitrary rotation, anisotropic scaling and fractional translation
    each applied with probability ``p``. In order, per example (all draws from its key):

    * x-flip / y-flip: bit ``w ~ U{0, 1}``, kept with probability ``p * xflip`` (``yflip``);
    * integer rotation: ``w ~ U{0..3}`` quarter turns as flips and a transpose;
    * integer translation: ``t = round(u * size * translate_int_max)``, ``u ~ U(-1, 1)``,
      reflect padding (see :func:`translate_int`);
    * isotropic scaling by ``2^(w * scale_std)``, ``w ~ N(0, 1)``;
    * rotation by ``w ~ U(-pi, pi) * rotate_frac_max``;
    * anisotropic scaling by ``2^(+-w * aniso_std)``, ``w ~ N(0, 1)``, along axes rotated
      by ``r ~ U(-pi, pi)`` with probability ``aniso_rotate_prob`` (else ``r = 0``);
    * fractional translation by ``w * size * translate_frac_std``, ``w ~ N(0, 1)``.

    The geometric transforms compose into one affine map applied by :func:`resample`
    (skipped, so exact, when an example drew none). A transform that is not drawn
    contributes zero labels. Colour transforms of the original are not implemented.
    Cost: roughly 0.5 ms per 32x32 RGB example on one core, about 0.25 s per batch of 512;
    run it in input workers (``make_iterator(workers=...)``) for CIFAR-scale training.

    ``"augment_label"`` columns: one group per transform with a non-zero multiplier, in
    the order above (see :attr:`label_names`). The default 9 columns are::

        0 xflip bit   1 yflip bit   2 scale w   3 cos(rot) - 1   4 sin(rot)
        5 aniso w*cos(r)   6 aniso w*sin(r)   7 translate w_x   8 translate w_y

    Integer rotation adds ``(w in {1, 2}, w in {2, 3})`` and integer translation adds
    ``(tx, ty) / (size * translate_int_max)`` after the flips, as in EDM.

    Attributes:
        p: Overall augmentation probability, in [0, 1].
        xflip: Probability multiplier of the x-flip (0 disables it and its label).
        yflip: Probability multiplier of the y-flip.
        rotate_int: Probability multiplier of quarter-turn rotation (square images only).
        translate_int: Probability multiplier of integer translation.
        translate_int_max: Integer translation range, relative to the image size.
        scale: Probability multiplier of isotropic scaling.
        rotate_frac: Probability multiplier of arbitrary rotation.
        aniso: Probability multiplier of anisotropic scaling.
        translate_frac: Probability multiplier of fractional translation.
        scale_std: Log2 standard deviation of isotropic scaling.
        rotate_frac_max: Rotation range, 1 = full circle.
        aniso_std: Log2 standard deviation of anisotropic scaling.
        aniso_rotate_prob: Probability of anisotropic scaling in a rotated frame.
        translate_frac_std: Fractional translation std, relative to the image size.
        order: Spline order of the resampling (0-5; 3 = cubic).
    """

    p: float = 0.12
    xflip: float = 1e8
    yflip: float = 1.0
    rotate_int: float = 0.0
    translate_int: float = 0.0
    translate_int_max: float = 0.125
    scale: float = 1.0
    rotate_frac: float = 1.0
    aniso: float = 1.0
    translate_frac: float = 1.0
    scale_std: float = 0.2
    rotate_frac_max: float = 1.0
    aniso_std: float = 0.2
    aniso_rotate_prob: float = 0.5
    translate_frac_std: float = 0.125
    order: int = 3

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, want: str) -> None:
            if not ok:
                raise ValueError(
                    f"EdmAugment {name}={getattr(self, name)!r} is invalid: pass {want}"
                )

        for name in ("p", "aniso_rotate_prob"):
            value = getattr(self, name)
            need(0.0 <= value <= 1.0, name, "a probability in [0, 1]")
        for name in (*_LABEL_NAMES, "scale_std", "aniso_std", "translate_frac_std"):
            value = getattr(self, name)
            need(math.isfinite(value) and value >= 0, name, "a finite value >= 0 (0 = off)")
        need(0.0 < self.translate_int_max < 1.0, "translate_int_max", "a fraction in (0, 1)")
        need(0.0 <= self.rotate_frac_max <= 1.0, "rotate_frac_max", "a fraction in [0, 1]")
        need(self.order in range(6), "order", "a spline order 0..5")

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of the ``"augment_label"`` columns, in order."""
        return tuple(n for t, names in _LABEL_NAMES.items() if getattr(self, t) > 0 for n in names)

    @property
    def label_dim(self) -> int:
        """Width of ``"augment_label"``: the network's ``augment_dim``."""
        return len(self.label_names)

    def __call__(self, batch: dict[str, np.ndarray], keys: np.ndarray) -> dict[str, np.ndarray]:
        """Augments a batch, example ``i`` from ``keys[i]`` alone.

        Args:
            batch: Batch whose ``"image"`` is float ``[B, H, W, C]``; other entries pass
                through.
            keys: Integer ``[B]`` per-example seeds.

        Returns:
            A new batch dict: float32 augmented ``"image"`` and float32 ``"augment_label"``
            ``[B, label_dim]`` (all zeros for an example that drew no transform).

        Raises:
            ValueError: For a non-image batch, bad keys, or ``rotate_int`` on non-square
                images.
        """
        image, keys = _check_inputs(batch, keys)
        if self.rotate_int > 0 and image.shape[1] != image.shape[2]:
            raise ValueError(
                f"EdmAugment rotate_int={self.rotate_int} needs square images, got "
                f"{image.shape[1]}x{image.shape[2]}; set rotate_int=0"
            )
        out = np.empty(image.shape, np.float32)
        labels = np.zeros((image.shape[0], self.label_dim), np.float32)
        for i, key in enumerate(keys):
            out[i], labels[i] = self._augment_one(image[i], int(key))
        return {**batch, "image": out, AUGMENT_LABEL: labels}

    def _augment_one(self, image: np.ndarray, key: int) -> tuple[np.ndarray, list[float]]:
        rng = np.random.default_rng([key, _EDM_SALT])
        h, w = image.shape[:2]
        labels: list[float] = []

        def keep(value, multiplier: float):
            # ``value`` was drawn before this call; zero it unless the transform is chosen.
            return value if rng.random() < multiplier * self.p else np.zeros_like(value)

        # Each transform draws its parameters before deciding whether to apply them, so the
        # stream never depends on a decision: raising p only adds transforms to an
        # example, with the same parameters. Transforms not drawn are skipped outright
        # (not applied as identities) to keep untouched examples bit-exact.

        # Pixel blitting: exact index shuffles, applied right away.
        if self.xflip > 0:
            bit = int(keep(rng.integers(2), self.xflip))
            image = image[:, ::-1] if bit else image
            labels.append(bit)
        if self.yflip > 0:
            bit = int(keep(rng.integers(2), self.yflip))
            image = image[::-1] if bit else image
            labels.append(bit)
        if self.rotate_int > 0:
            turns = int(keep(rng.integers(4), self.rotate_int))
            image = image[:, ::-1] if turns in (1, 2) else image
            image = image[::-1] if turns in (2, 3) else image
            image = image.transpose(1, 0, 2) if turns in (1, 3) else image
            labels += [float(turns in (1, 2)), float(turns in (2, 3))]
        if self.translate_int > 0:
            u = keep(rng.uniform(-1.0, 1.0, 2), self.translate_int)
            tx = int(np.round(u[0] * w * self.translate_int_max))
            ty = int(np.round(u[1] * h * self.translate_int_max))
            image = translate_int(image, tx, ty) if tx or ty else image
            labels += [tx / (w * self.translate_int_max), ty / (h * self.translate_int_max)]

        # Geometric transforms: compose the output -> input map, as EDM's G_inv.
        g_inv = np.eye(3)
        if self.scale > 0:
            z = float(keep(rng.standard_normal(), self.scale))
            if z:
                s = 2.0 ** (z * self.scale_std)
                g_inv = g_inv @ _scale(1 / s, 1 / s)
            labels.append(z)
        if self.rotate_frac > 0:
            theta = rng.uniform(-1.0, 1.0) * math.pi * self.rotate_frac_max
            theta = float(keep(theta, self.rotate_frac))
            if theta:
                g_inv = g_inv @ _rotate(theta)
            labels += [math.cos(theta) - 1, math.sin(theta)]
        if self.aniso > 0:
            z, r = rng.standard_normal(), rng.uniform(-1.0, 1.0) * math.pi
            z = float(keep(z, self.aniso))
            r = r if rng.random() < self.aniso_rotate_prob else 0.0  # not scaled by p
            if z:
                s = 2.0 ** (z * self.aniso_std)
                g_inv = g_inv @ _rotate(-r) @ _scale(1 / s, s) @ _rotate(r)
            labels += [z * math.cos(r), z * math.sin(r)]
        if self.translate_frac > 0:
            z = keep(rng.standard_normal(2), self.translate_frac)
            if z.any():
                std = self.translate_frac_std
                g_inv = g_inv @ _translate(-z[0] * w * std, -z[1] * h * std)
            labels += [float(z[0]), float(z[1])]

        if not np.array_equal(g_inv, np.eye(3)):
            image = resample(image, g_inv, self.order)
        return image, labels
