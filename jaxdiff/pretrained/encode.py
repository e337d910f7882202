r"""Encodes an image dataset into VAE latents once, as ArrayRecord shards.

Usage::

    python -m jaxdiff.pretrained.encode --src data/imagenet/train --dst data/in256-latents \\
        --vae sd-vae-ft-ema.safetensors [--dataset imagefolder|arrayrecord|TFDS_NAME] \\
        [--image_size 256] [--batch_size 64] [--flip] [--dtype float32|bfloat16]

then train with ``--config.data.name=latents --config.data.path=data/in256-latents``.
``--src`` is the image folder (cropped to ``--image_size`` as ``prepare`` does), the
folder ``python -m jaxdiff.data.prepare`` wrote, or the TFDS data dir. Records hold the raw
posterior mean and std of each image and its label; ``--flip`` adds the moments of the
mirrored image (format: :mod:`jaxdiff.data.latents`). Batches are jitted and split over
this host's devices. As ``prepare``, each shard is renamed (or uploaded, for ``--dst
gs://``) when complete and gets a marker ``.encode/<shard>.json``; a rerun keeps matching
shards (same source slice, VAE file, dtype, flip) and redoes the rest. ``dataset.json``
comes last, with the VAE file, config and scaling, image size, source and latent shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import numpy as np

from jaxdiff.data import latents as latents_lib
from jaxdiff.data import shard_writer, shards
from jaxdiff.data.registry import get_dataset
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.pretrained.encode_batches import BatchEncoder, read_ahead
from jaxdiff.utils import storage

MARKER_DIR = ".encode"
ENCODE_VERSION = 1
#: Default shard size target, as for ``prepare``.
TARGET_SHARD_BYTES = 128 << 20
_FILE_DATASETS = ("imagefolder", "arrayrecord")


@dataclasses.dataclass(frozen=True)
class EncodeSummary:
    """What :func:`encode_dataset` produced.

    Attributes:
        path: The dataset folder.
        num_examples: Images encoded.
        num_shards: Shard files.
        reused_shards: Shards kept from an earlier, interrupted run.
        latent_shape: ``(h, w, c)`` of one latent.
    """

    path: str
    num_examples: int
    num_shards: int
    reused_shards: int
    latent_shape: tuple[int, ...]


def vae_file_info(path: str) -> dict[str, Any]:
    """The VAE file's identity for markers and metadata: path, data hash and config.

    Reads only the safetensors header: converted files carry the SHA-256 of their data
    (``jaxdiff.sha256``) and their config (``jaxdiff.config``); other files are hashed.
    """
    meta: dict[str, str] = {}
    with storage.open_file(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8 and (size := struct.unpack("<Q", head)[0]) < 100 << 20:
            try:
                meta = dict(json.loads(f.read(size)).get("__metadata__") or {})
            except (ValueError, AttributeError):
                meta = {}
    digest = meta.get("jaxdiff.sha256")
    if not digest:
        digest = hashlib.sha256(storage.read_bytes(path)).hexdigest()
    try:
        config = json.loads(meta.get("jaxdiff.config", "null"))
    except ValueError:
        config = None
    return {"path": path, "sha256": digest, "config": config}


@dataclasses.dataclass(frozen=True)
class _Shard:
    """One shard to write: its example range, files and the digest its marker records."""

    start: int
    stop: int
    file: str
    marker: str
    digest: str


def _is_complete(shard: _Shard) -> bool:
    """Whether the shard is complete and its marker matches this run's digest."""
    if not (storage.exists(shard.marker) and storage.exists(shard.file)):
        return False
    try:
        marker = json.loads(storage.read_text(shard.marker))
    except json.JSONDecodeError:
        return False
    if marker.get("digest") != shard.digest:
        return False
    if storage.is_remote(shard.file):  # uploads are whole; the marker follows the upload
        return True
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(shard.file)
    try:  # a truncated file opens with ok() False and zero records
        return reader.ok() and reader.num_records() == marker.get("num_examples")
    finally:
        reader.close()


def _check_dst(out: str, src: str, dataset: str) -> None:
    """Refuses destinations that would destroy data or cannot hold a dataset."""
    if dataset in _FILE_DATASETS and not storage.is_remote(out) and not storage.is_remote(src):
        if out == src or out.startswith(src.rstrip("/") + "/"):
            raise InvalidArgumentError(
                f"--dst {out} is inside --src {src}; write the latents to another folder"
            )
    if storage.exists(out) and not storage.isdir(out):
        raise InvalidArgumentError(f"--dst {out} is a file; pass a folder for the shards")
    meta_file = storage.join(out, shards.METADATA_FILE)
    if storage.exists(meta_file):
        try:
            old = json.loads(storage.read_text(meta_file))
        except json.JSONDecodeError:
            old = {}
        if latents_lib.METADATA_KEY not in old:  # e.g. a prepared pixel dataset
            raise InvalidArgumentError(
                f"--dst {out} already holds a dataset that is not VAE latents; write the "
                "latents to another folder (or delete that one)"
            )


def _load_vae(path: str, scaling: str | None) -> Any:
    from jaxdiff.pretrained.registry import load_vae
    from jaxdiff.pretrained.vae import LATENT_SCALINGS

    if scaling is not None and scaling not in LATENT_SCALINGS:
        raise InvalidArgumentError(
            f"--scaling must be one of {sorted(LATENT_SCALINGS)}, got {scaling!r}"
        )
    # Without --scaling and without a scaling_factor in the file: the SD-VAE's own
    # 0.18215, used by DiT, SiT and REPA.
    chosen = None if scaling is None else LATENT_SCALINGS[scaling]
    return load_vae(path, chosen, fallback_scaling=LATENT_SCALINGS["dit"])


def _flag_path(flag: str, path: storage.PathLike) -> str:
    try:
        return storage.to_str(path)
    except ValueError as err:  # an unsupported URL scheme
        raise InvalidArgumentError(f"--{flag}: {err}") from err


def _open_source(dataset: str, src: str, split: str, image_size: int | None) -> tuple[Any, int]:
    if dataset == "imagefolder" and image_size is None:
        image_size = 256
    if image_size is not None and (isinstance(image_size, bool) or image_size < 1):
        raise InvalidArgumentError(f"--image_size must be a positive integer, got {image_size}")
    source = get_dataset(
        dataset,
        split=split,
        data_dir=None if dataset in _FILE_DATASETS else src,
        path=src if dataset in _FILE_DATASETS else None,
        image_size=image_size,
    )
    shape = tuple(source.info.image_shape)
    if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3:
        raise InvalidArgumentError(
            f"--dataset {dataset} at {src} has examples of shape {shape}; the VAE encodes "
            "square RGB images [S, S, 3]"
        )
    if image_size is not None and shape[0] != image_size:
        raise InvalidArgumentError(
            f"--dataset {dataset} at {src} holds {shape[0]}px images but --image_size="
            f"{image_size}; pass --image_size={shape[0]} (resize with an image folder)"
        )
    return source, shape[0]


def encode_dataset(
    src: storage.PathLike,
    dst: storage.PathLike,
    *,
    vae_file: storage.PathLike,
    vae: Any = None,
    scaling: str | None = None,
    dataset: str = "imagefolder",
    split: str = "train",
    image_size: int | None = None,
    batch_size: int = 64,
    flip: bool = False,
    dtype: str = "float32",
    num_shards: int | None = None,
    threads: int = 8,
    progress: bool = True,
) -> EncodeSummary:
    """Encodes a dataset's images into posterior moments in ArrayRecord shards.

    Args:
        src: Image folder, prepared shards, or TFDS data dir (see ``dataset``).
        dst: Output folder (local or ``gs://``); rerunning resumes an interrupted run.
        vae_file: The converted VAE weight file (identity and config for the metadata).
        vae: The loaded VAE (default ``load_vae(vae_file)``): a
            :class:`~jaxdiff.pretrained.vae_handle.PretrainedVAE`, or any object with a traceable
            ``encode_moments`` and a ``scaling`` with ``scale`` and ``shift``.
        scaling: Latent space of the model to train, by name (``dit``, ``edm2``, ``sdxl``,
            ``sd3``, ``flux``: :data:`jaxdiff.pretrained.vae.LATENT_SCALINGS`); it sets the
            stored scale/shift and, for ``edm2``, the [0, 1] pixel range EDM2's VAE sees.
            None: the VAE file's own ``scaling_factor``, else ``dit`` (0.18215).
        dataset: ``"imagefolder"``, ``"arrayrecord"`` or a TFDS name.
        split: Split to encode (TFDS).
        image_size: Square crop side (image folders; default 256), checked for others.
        batch_size: Images per jitted call (rounded up to a multiple of the devices).
        flip: Also store the moments of the left-right mirrored images.
        dtype: Storage dtype of the moments, ``"float32"`` or ``"bfloat16"``.
        num_shards: Shard files; default about 128 MiB each, at least 8.
        threads: Threads reading (decoding) batches ahead of the devices.
        progress: Show a tqdm progress bar over images.

    Returns:
        An :class:`EncodeSummary`.

    Raises:
        InvalidArgumentError: For a missing VAE file, a bad destination or argument.
    """
    vae_path, out = _flag_path("vae", vae_file), _flag_path("dst", dst)
    root = _flag_path("src", src) if dataset in _FILE_DATASETS else str(src)
    if not storage.isfile(vae_path):
        raise InvalidArgumentError(
            f"--vae {vae_path} does not exist; pass the VAE weight file converted with "
            "python -m jaxdiff.pretrained.convert"
        )
    if dtype not in latents_lib.DTYPES:
        raise InvalidArgumentError(f"--dtype must be one of {latents_lib.DTYPES}, got {dtype!r}")
    for name, value in (("batch_size", batch_size), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"--{name} must be a positive integer, got {value!r}")
    _check_dst(out, root, dataset)
    source, size = _open_source(dataset, root, split, image_size)
    try:
        storage.makedirs(storage.join(out, MARKER_DIR))
    except OSError as err:
        raise InvalidArgumentError(f"--dst {out} cannot be created ({err})") from err
    vae = _load_vae(vae_path, scaling) if vae is None else vae
    identity, encoder = vae_file_info(vae_path), BatchEncoder(vae, batch_size=batch_size, flip=flip)
    latent_shape = encoder.latent_shape((size, size, 3))
    n, labelled = len(source), source.info.num_classes is not None
    features = latents_lib.latent_features(latent_shape, dtype, flipped=flip, labelled=labelled)
    if num_shards is None:
        total = n * sum(f.nbytes for f in features)
        num_shards = max(1, min(n, max(8, math.ceil(total / TARGET_SHARD_BYTES))))
    bounds = shards.shard_bounds(n, num_shards)
    # A rerun may change what the shards hold: the old metadata goes first.
    storage.remove(storage.join(out, shards.METADATA_FILE))
    if not storage.is_remote(out):  # cloud shards are uploaded whole: no partial objects
        for name in storage.listdir(out):
            if name.startswith(".shard-") and ".tmp-" in name:
                storage.remove(storage.join(out, name))
    described = {"dataset": dataset, "path": root, "split": split, "num_examples": n}
    common = {"version": ENCODE_VERSION, "source": described, "size": size, "dtype": dtype}
    common.update(vae=identity["sha256"], flip=bool(flip), labelled=labelled, of=num_shards)
    common["source_meta"] = getattr(source, "metadata", None)  # prepared shards
    todo = []
    for i, (start, stop) in enumerate(bounds):
        name = shards.shard_name(i, num_shards)
        fields = {**common, "range": [start, stop], **_slice_identity(source, start, stop)}
        text = json.dumps(fields, sort_keys=True, default=str)
        shard = _Shard(
            start,
            stop,
            storage.join(out, name),
            storage.join(out, MARKER_DIR, name + ".json"),
            hashlib.sha256(text.encode()).hexdigest(),
        )
        if not _is_complete(shard):
            todo.append(shard)

    from tqdm.auto import tqdm

    left = sum(shard.stop - shard.start for shard in todo)
    bar = tqdm(total=n, initial=n - left, unit="img", desc="encode", disable=not progress)
    with bar, futures.ThreadPoolExecutor(threads) as pool:
        for shard in todo:
            _encode_shard(shard, source, encoder, features, pool, 2 * threads, bar.update)
    scaling = vae.scaling
    latents = latents_lib.latent_metadata(
        scale=scaling.scale, shift=scaling.shift, latent_shape=latent_shape, flipped=flip
    )
    # The image range the VAE saw ([0, 1] for EDM2's latent space): decoding must match it.
    latents["pixel_range"] = [float(v) for v in getattr(scaling, "pixel_range", (-1.0, 1.0))]
    shard_writer.write_metadata(
        out,
        features=features,
        shards=[(shards.shard_name(i, num_shards), b - a) for i, (a, b) in enumerate(bounds)],
        classes=getattr(source, "classes", None),
        num_classes=source.info.num_classes,
        image_size=size,
        extra={
            "source": described,
            "encoder": "jaxdiff.pretrained.encode",
            latents_lib.METADATA_KEY: {**latents, "vae": identity},
        },
    )
    return EncodeSummary(out, n, num_shards, num_shards - len(todo), latent_shape)


def _slice_identity(source: Any, start: int, stop: int) -> dict[str, Any]:
    """What identifies a shard's images beyond the source's name: an image folder's files."""
    files, labels = getattr(source, "files", None), getattr(source, "labels", None)
    if files is None:
        return {}
    part = None if labels is None else [int(x) for x in labels[start:stop]]
    return {"files": list(files[start:stop]), "labels": part}


def _encode_shard(
    shard: _Shard,
    source: Any,
    encoder: BatchEncoder,
    features: Sequence[shards.Feature],
    pool: futures.Executor,
    depth: int,
    advance: Callable[[int], Any],
) -> None:
    """Encodes one shard's images into its file, then writes its marker."""
    storage.remove(shard.marker)  # never vouch for a shard this run is replacing
    step = encoder.batch
    chunks = [np.arange(s, min(s + step, shard.stop)) for s in range(shard.start, shard.stop, step)]
    with shard_writer.ShardWriter(shard.file, features) as writer:
        pending = None
        for batch in read_ahead(pool, source.get_batch, chunks, depth):
            started = (encoder(batch["image"]), len(batch["image"]), batch.get("label"))
            if pending is not None:  # copy the previous batch out while this one runs
                _write(writer, *pending)
                advance(pending[1])
            pending = started
        if pending is not None:
            _write(writer, *pending)
            advance(pending[1])
    marker = {"digest": shard.digest, "num_examples": writer.num_written}
    storage.write_text(shard.marker, json.dumps(marker))


def _write(writer: shard_writer.ShardWriter, out: dict, count: int, label: Any) -> None:
    arrays = {k: np.asarray(v)[:count] for k, v in out.items()}
    if label is not None:
        arrays["label"] = np.asarray(label, np.int32)
    writer.write_batch(**arrays)


def _define_flags() -> dict[str, Any]:
    from absl import flags

    f, req = flags, {"required": True}
    return {
        "src": f.DEFINE_string("src", None, "Image folder, prepared shards or TFDS dir.", **req),
        "dst": f.DEFINE_string("dst", None, "Output folder (local or gs://).", **req),
        "vae_file": f.DEFINE_string("vae", None, "Converted VAE file (.safetensors).", **req),
        "scaling": f.DEFINE_string("scaling", None, "Latent space: dit, edm2, sdxl, sd3, flux."),
        "dataset": f.DEFINE_string("dataset", "imagefolder", "imagefolder, arrayrecord, TFDS."),
        "split": f.DEFINE_string("split", "train", "Split to encode (TFDS)."),
        "image_size": f.DEFINE_integer("image_size", None, "Crop side (default 256)."),
        "batch_size": f.DEFINE_integer("batch_size", 64, "Images per jitted call."),
        "flip": f.DEFINE_bool("flip", False, "Also store the mirrored images' moments."),
        "dtype": f.DEFINE_enum("dtype", "float32", list(latents_lib.DTYPES), "Storage dtype."),
        "num_shards": f.DEFINE_integer("num_shards", None, "Shard files (default: auto)."),
        "threads": f.DEFINE_integer("threads", 8, "Threads reading images ahead."),
        "progress": f.DEFINE_bool("progress", True, "Show a progress bar."),
    }


def main(argv: Sequence[str], flag_values: dict[str, Any]) -> None:
    """Runs the command with parsed flags; prints a one-line summary."""
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    values = {key: holder.value for key, holder in flag_values.items()}
    summary = encode_dataset(values.pop("src"), values.pop("dst"), **values)
    print(
        f"wrote latents {list(summary.latent_shape)} of {summary.num_examples} images in "
        f"{summary.num_shards} shards to {summary.path} ({summary.reused_shards} shards kept "
        "from an earlier run)"
    )


if __name__ == "__main__":
    from jaxdiff.utils import cli

    _FLAGS = _define_flags()
    cli.run(lambda argv: main(argv, _FLAGS))
