"""VAE latents encoded once into ArrayRecord shards, read for latent-diffusion training.

``python -m jaxdiff.pretrained.encode`` (or :func:`write_latents`) writes a prepared
dataset (format: :mod:`jaxdiff.data.shards`) whose records hold the VAE posterior of each
image, *raw* (unscaled), as float32 or bfloat16:

* ``image``: the posterior mean ``[h, w, c]`` (named ``image`` so that the generic shard
  reader opens the folder; :func:`jaxdiff.data.get_dataset` refuses to read it as plain
  ``"arrayrecord"``, which would skip the scaling);
* ``std``: the posterior standard deviation, same shape;
* ``image_flipped`` and ``std_flipped`` (``encode --flip``): the moments of the
  left-right mirrored image, a second feature pair of the same record;
* ``label`` (int32) when the source is labelled.

``dataset.json`` adds a ``"latents"`` entry: the VAE's ``scale`` and ``shift`` (per channel;
``model latent = (raw - shift) * scale``), the latent shape, the VAE file and its config.

:class:`LatentSource` (dataset name ``"latents"``) reads them. Its ``"image"`` is the
scaled posterior mean. In ``mode="sample"`` (DiT, REPA) :attr:`LatentSource.augmentation`
replaces it by a fresh posterior sample ``mean + std * noise`` (then scaled) every time an
example is drawn; the noise comes from the pipeline's per-example key, a hash of ``(seed,
global position in the example stream)`` (:func:`jaxdiff.data.pipeline.augment_keys`), so
every epoch draws new noise and a resumed run (on any topology) draws the same noise as
an uninterrupted one. With flipped moments stored and ``flip=True``, the same key picks
the mirrored image's moments half of the time.

Example::

    source = LatentSource("data/imagenet256-latents", mode="sample")
    it = make_iterator(source, global_batch_size=256, seed=0, augment=source.augmentation)
    next(it)["image"].shape   # (256, 32, 32, 4): scaled posterior samples
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxdiff.data import shard_writer
from jaxdiff.data.augment import mix64
from jaxdiff.data.shards import (
    METADATA_FILE,
    ArrayRecordSource,
    Feature,
    read_metadata,
    shard_bounds,
    shard_name,
)
from jaxdiff.data.sources import Batch
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.utils import storage

#: ``dataset.json`` key of the latent description; its presence marks a latent dataset.
METADATA_KEY = "latents"
LATENTS_VERSION = 1
#: Stored feature names: posterior mean and std, and those of the mirrored image.
MEAN, STD, MEAN_FLIPPED, STD_FLIPPED = "image", "std", "image_flipped", "std_flipped"
#: ``mode`` values: a fresh posterior sample per draw, or the posterior mean.
MODES = ("sample", "mean")
#: Storage dtypes of the moments.
DTYPES = ("float32", "bfloat16")
# Batch entries LatentSource adds for LatentAugment, which consumes and removes them.
_BATCH_STD, _BATCH_MEAN_FLIPPED, _BATCH_STD_FLIPPED = (
    "latent_std",
    "latent_flipped",
    "latent_flipped_std",
)
_EXTRA_KEYS = (_BATCH_STD, _BATCH_MEAN_FLIPPED, _BATCH_STD_FLIPPED)
# Salts separate the noise and flip streams from each other and from augment.py's.
_NOISE_SALT = 0x510E527FADE682D1
_FLIP_SALT = 0x9B05688C2B3E6C1F


def latent_features(
    latent_shape: Sequence[int], dtype: str = "float32", *, flipped: bool, labelled: bool
) -> list[Feature]:
    """The record layout of a latent dataset (see the module docstring)."""
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"latent dtype must be one of {DTYPES}, got {dtype!r}")
    shape = tuple(int(d) for d in latent_shape)
    names = [MEAN, STD] + ([MEAN_FLIPPED, STD_FLIPPED] if flipped else [])
    features = [Feature(name, shape, dtype) for name in names]
    return features + ([Feature("label", (), "int32")] if labelled else [])


def _channels(value: Any) -> list[float]:
    return [float(v) for v in np.asarray(value, np.float64).reshape(-1)]


def latent_metadata(
    *,
    scale: Any,
    shift: Any,
    latent_shape: Sequence[int],
    flipped: bool,
    vae: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``"latents"`` entry of ``dataset.json``.

    Args:
        scale: VAE scale, a scalar or one value per channel.
        shift: VAE shift, likewise (``model latent = (raw - shift) * scale``).
        latent_shape: ``[h, w, c]`` of one latent.
        flipped: Whether the mirrored images' moments are stored too.
        vae: Where the latents came from (file, checksum, config), JSON-serialisable.
    """
    return {
        "version": LATENTS_VERSION,
        "mean": MEAN,
        "std": STD,
        "flipped": [MEAN_FLIPPED, STD_FLIPPED] if flipped else None,
        "scale": _channels(scale),
        "shift": _channels(shift),
        "latent_shape": [int(d) for d in latent_shape],
        "vae": dict(vae or {}),
    }


def write_latents(
    path: storage.PathLike,
    mean: np.ndarray,
    std: np.ndarray,
    label: np.ndarray | None = None,
    *,
    scale: Any = 1.0,
    shift: Any = 0.0,
    mean_flipped: np.ndarray | None = None,
    std_flipped: np.ndarray | None = None,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    dtype: str = "float32",
    num_shards: int = 1,
) -> str:
    """Writes in-memory posterior moments as a latent dataset (e.g. from your own encoder).

    Args:
        path: Destination folder (local or ``gs://``); an existing dataset is replaced.
        mean: Raw posterior means ``[N, h, w, c]``.
        std: Raw posterior standard deviations, same shape.
        label: Optional integer labels ``[N]``.
        scale: The VAE's scale (scalar or ``[c]``).
        shift: The VAE's shift (scalar or ``[c]``).
        mean_flipped: Optional moments of the mirrored images (both or neither).
        std_flipped: See ``mean_flipped``.
        classes: Optional label names.
        num_classes: Number of classes (default ``label.max() + 1``).
        image_size: Pixel size the latents were encoded from, if known.
        dtype: ``"float32"`` or ``"bfloat16"``.
        num_shards: Shard files.

    Returns:
        The dataset folder, as a string.
    """
    arrays = {MEAN: np.asarray(mean), STD: np.asarray(std)}
    flipped = mean_flipped is not None or std_flipped is not None
    if flipped:
        arrays.update(
            {MEAN_FLIPPED: np.asarray(mean_flipped), STD_FLIPPED: np.asarray(std_flipped)}
        )
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or arrays[MEAN].ndim != 4:
        raise InvalidArgumentError(
            f"latent moments must share one [N, h, w, c] shape, got {shapes}"
        )
    if label is not None:
        arrays["label"] = np.asarray(label).astype(np.int32)
        if num_classes is None and classes is None and len(label):
            num_classes = int(np.max(label)) + 1
    shape = arrays[MEAN].shape[1:]
    features = latent_features(shape, dtype, flipped=flipped, labelled=label is not None)
    storage.remove(storage.join(path, METADATA_FILE))  # first: never a stale dataset
    shards = []
    for i, (start, stop) in enumerate(shard_bounds(len(arrays[MEAN]), num_shards)):
        name = shard_name(i, num_shards)
        with shard_writer.ShardWriter(storage.join(path, name), features) as writer:
            writer.write_batch(**{k: v[start:stop] for k, v in arrays.items()})
        shards.append((name, stop - start))
    meta = latent_metadata(scale=scale, shift=shift, latent_shape=shape, flipped=flipped)
    shard_writer.write_metadata(
        path,
        features=features,
        shards=shards,
        classes=classes,
        num_classes=num_classes,
        image_size=image_size,
        extra={METADATA_KEY: meta},
    )
    return storage.to_str(path)


@dataclasses.dataclass(frozen=True)
class LatentAugment:
    """Turns :class:`LatentSource` batches into training latents, example ``i`` from ``keys[i]``.

    An augmentation (protocol of :mod:`jaxdiff.data.pipeline`): with ``flip``, the top bit
    of a SplitMix64 hash of the key picks the mirrored image's moments; with ``sample``,
    ``image + std * noise`` with standard normal noise from ``default_rng([key, salt])``
    (``image`` and ``std`` arrive already scaled, so this is ``(mean + raw_std * noise -
    shift) * scale``). The helper entries of the batch are removed.

    Attributes:
        sample: Draw a posterior sample (else keep the mean).
        flip: Choose between the stored moments of the image and of its mirror.
    """

    sample: bool = True
    flip: bool = False

    def __call__(self, batch: Batch, keys: np.ndarray) -> Batch:
        """Returns the batch with ``"image"`` the chosen (sampled) scaled latents."""
        image = np.asarray(batch["image"], np.float32)
        keys = np.asarray(keys)
        if keys.shape != image.shape[:1] or not np.issubdtype(keys.dtype, np.integer):
            raise ValueError(
                f"keys must be an integer array of shape {image.shape[:1]}, got {keys.dtype} "
                f"{keys.shape}"
            )
        keys = keys.astype(np.uint64)
        needed = {_BATCH_STD: self.sample, _BATCH_MEAN_FLIPPED: self.flip}
        needed[_BATCH_STD_FLIPPED] = self.sample and self.flip
        missing = [k for k, need in needed.items() if need and k not in batch]
        if missing:
            raise ValueError(
                f"batch lacks {missing}: LatentAugment(sample={self.sample}, flip={self.flip}) "
                "needs a LatentSource built with the same mode and flip; use its .augmentation"
            )
        std = batch.get(_BATCH_STD)
        if self.flip:
            pick = (mix64(keys ^ np.uint64(_FLIP_SALT)) >> np.uint64(63)).astype(bool)
            pick = pick.reshape(-1, *([1] * (image.ndim - 1)))
            image = np.where(pick, batch[_BATCH_MEAN_FLIPPED], image)
            if self.sample:
                std = np.where(pick, batch[_BATCH_STD_FLIPPED], std)
        if self.sample:
            noise = np.empty(image.shape, np.float32)
            for i, key in enumerate(keys):
                rng = np.random.default_rng([int(key), _NOISE_SALT])
                noise[i] = rng.standard_normal(image.shape[1:], dtype=np.float32)
            image = image + std * noise
        out = {k: v for k, v in batch.items() if k not in _EXTRA_KEYS}
        out["image"] = np.asarray(image, np.float32)
        return out


def _per_channel(value: Any, channels: int, what: str, root: str) -> np.ndarray:
    try:
        arr = np.asarray(value, np.float64).reshape(-1)
    except (TypeError, ValueError):
        arr = np.array([np.nan])
    if arr.size not in (1, channels) or not np.all(np.isfinite(arr)):
        raise InvalidArgumentError(
            f"latent {what}={value!r} for {root} must be a finite number or {channels} "
            f"numbers (one per latent channel): fix --config.data.latent_{what}"
        )
    return np.broadcast_to(arr, (channels,)).astype(np.float32)


class LatentSource:
    """Random-access source over encoded latents; ``"image"`` is the scaled posterior mean.

    Args:
        path: Folder written by ``python -m jaxdiff.pretrained.encode`` or
            :func:`write_latents` (local or ``gs://``).
        mode: ``"sample"`` (a posterior sample per draw, through :attr:`augmentation`) or
            ``"mean"`` (the posterior mean).
        flip: Use the stored moments of mirrored images (through :attr:`augmentation`):
            ``True`` needs them, ``None`` uses them when stored, ``False`` never does.
        scale: Override the VAE scale of the metadata (scalar or one per channel).
        shift: Override the VAE shift likewise.
        name: Dataset name for :attr:`info`.
        split: Split name for :attr:`info`.

    Attributes:
        info: ``image_shape`` is the latent shape ``(h, w, c)``.
        metadata: The parsed ``dataset.json``.
        classes: Label names, or ``None``.
        scale: Per-channel float32 scale in use.
        shift: Per-channel float32 shift in use.

    Raises:
        InvalidArgumentError: For a folder that holds no latents, a bad mode, scale or
            shift, or ``flip=True`` without stored flips.
    """

    def __init__(
        self,
        path: storage.PathLike,
        *,
        mode: str = "sample",
        flip: bool | None = None,
        scale: Any = None,
        shift: Any = None,
        name: str = "latents",
        split: str = "train",
    ) -> None:
        root = storage.to_str(path)
        if mode not in MODES:
            raise InvalidArgumentError(
                f"latent mode {mode!r} is not one of {MODES}: set --config.data.latents="
                "sample (a posterior sample per epoch, as DiT/REPA) or mean"
            )
        meta = read_metadata(root)
        latents = meta.get(METADATA_KEY)
        if not isinstance(latents, dict) or latents.get("version") != LATENTS_VERSION:
            raise InvalidArgumentError(
                f"{root} does not hold VAE latents (its {METADATA_FILE} has no "
                f"{METADATA_KEY!r} entry of version {LATENTS_VERSION}): encode images with "
                "python -m jaxdiff.pretrained.encode --src IMAGES --dst DIR --vae VAE, or read "
                "plain arrays with --config.data.name=arrayrecord"
            )
        self._shards = ArrayRecordSource(root, name=name, split=split)
        self.root, self.metadata, self.classes = root, meta, self._shards.classes
        self.info = self._shards.info
        stored = bool(latents.get("flipped"))
        if flip and not stored:
            raise InvalidArgumentError(
                f"{root} holds no mirrored-image latents (it was encoded without --flip): "
                "encode again with --flip, or set --config.data.random_flip=False"
            )
        self.mode, self.flip = mode, stored if flip is None else bool(flip)
        channels = self.info.image_shape[-1]
        self.scale = _per_channel(
            latents["scale"] if scale is None else scale, channels, "scale", root
        )
        self.shift = _per_channel(
            latents["shift"] if shift is None else shift, channels, "shift", root
        )

    @property
    def augmentation(self) -> LatentAugment | None:
        """The augmentation that finishes this source's batches (``None`` when not needed)."""
        if self.mode == "mean" and not self.flip:
            return None
        return LatentAugment(sample=self.mode == "sample", flip=self.flip)

    def __len__(self) -> int:
        """Number of examples."""
        return self.info.num_examples

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Reads ``{"image": scaled means, "label"}`` plus what :attr:`augmentation` needs."""
        raw = self._shards.read_raw(indices)

        def scaled(name: str, centre: bool) -> np.ndarray:
            value = raw[name].astype(np.float32)
            return (value - self.shift) * self.scale if centre else value * self.scale

        batch = {"image": scaled(MEAN, True)}
        if self.mode == "sample":
            batch[_BATCH_STD] = scaled(STD, False)
        if self.flip:
            batch[_BATCH_MEAN_FLIPPED] = scaled(MEAN_FLIPPED, True)
            if self.mode == "sample":
                batch[_BATCH_STD_FLIPPED] = scaled(STD_FLIPPED, False)
        if "label" in raw:
            batch["label"] = raw["label"].astype(np.int32)
        return batch

    def __getitem__(self, index: int) -> Batch:
        """Example ``index`` as :meth:`get_batch` returns it (negative counts from the end)."""
        index = int(index)
        return {
            k: v[0] for k, v in self.get_batch([index % len(self) if index < 0 else index]).items()
        }

    def __repr__(self) -> str:
        return f"LatentSource({self.root!r}, mode={self.mode!r}, flip={self.flip}, {self.info})"


__all__ = [
    "DTYPES",
    "MEAN",
    "MEAN_FLIPPED",
    "METADATA_KEY",
    "MODES",
    "STD",
    "STD_FLIPPED",
    "LatentAugment",
    "LatentSource",
    "latent_features",
    "latent_metadata",
    "write_latents",
]
