r"""Writes the reference statistics of a data set: ``python -m jaxdiff.metrics.reference_stats``.

Examples::

    # FD-digits statistics of the digits "train" split (no downloads, seconds on a CPU)
    python -m jaxdiff.metrics.reference_stats --dataset=digits --evaluator=fd_digits \
        --out=stats/digits_train.npz

    # An ADM-layout reference batch (10 000 images + pool3 and sFID statistics): the
    # reference of the full table, python -m sample --eval=fid,sfid,is,prec_recall
    python -m jaxdiff.metrics.reference_stats --dataset=imagefolder --path=gs://b/val \
        --image_size=256 --evaluator=adm --inception_weights=fid_inception.npz \
        --out=gs://b/ref/val256_adm.npz

    # FID statistics of CIFAR-10, read from a bucket, written to a bucket
    python -m jaxdiff.metrics.reference_stats --dataset=cifar10 --data_dir=gs://b/tfds \
        --evaluator=fid --inception_weights=gs://b/fid_inception.npz \
        --out=gs://b/stats/cifar10_train.npz

The data set is built with :func:`jaxdiff.data.get_dataset` and streamed through the
evaluator's feature network in batches (:func:`jaxdiff.metrics.reference_statistics`),
so any size fits in memory; with several processes (``JAXDIFF_COORDINATOR`` etc., or a
TPU pod / SLURM) each reads its own slice. The file format is described in
:mod:`jaxdiff.metrics.statistics`; pass the file to the ``fid`` evaluator as
``reference_stats=`` (or to ``fd_digits``, for FD-digits against it). A bad flag, data
set or path is one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

from absl import app, flags

from jaxdiff.utils import cli

_DATASET = flags.DEFINE_string("dataset", None, "Dataset name, as for jaxdiff.data.get_dataset.")
_PATH = flags.DEFINE_string("path", None, "Location of a file-based dataset (local or gs://).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Side image folders are cropped to.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared TFDS data folder (local or gs://).")
_SPLIT = flags.DEFINE_string("split", "train", "Split to describe.")
_EVALUATOR = flags.DEFINE_enum(
    "evaluator",
    None,
    ["fid", "fd_digits", "fd_dinov2", "adm"],
    "Evaluator whose features to describe; adm writes an ADM reference batch (images + "
    "pool3 and spatial statistics) for sfid, prec_recall and kid.",
)
_OUT = flags.DEFINE_string("out", None, "Output .npz (local or gs://).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images per feature batch (over all devices).")
_NUM = flags.DEFINE_integer(
    "num", None, "Use only the first NUM examples (default: all; adm: 10000 as ADM's batches)."
)
_INCEPTION = flags.DEFINE_string(
    "inception_weights",
    None,
    "fid, adm: converted Inception .npz (default $JAXDIFF_INCEPTION_WEIGHTS).",
)
_CLASSIFIER = flags.DEFINE_string(
    "classifier", None, "fd_digits: classifier .npz (default: the shipped one)."
)
_DINOV2 = flags.DEFINE_string(
    "dinov2_weights",
    None,
    "fd_dinov2: converted DINOv2 .safetensors (default $JAXDIFF_DINOV2_WEIGHTS).",
)
flags.mark_flags_as_required(["dataset", "evaluator", "out"])


def _check_flags() -> None:
    """Fails before any data is read (a run can take hours) on flags that cannot work."""
    from jaxdiff.utils import storage

    if _BATCH.value < 1:
        raise ValueError(f"--batch_size={_BATCH.value} must be >= 1")
    if _NUM.value is not None and _NUM.value < 2:
        raise ValueError(f"--num={_NUM.value} must be >= 2 (a covariance needs 2 examples)")
    if _IMAGE_SIZE.value is not None and _IMAGE_SIZE.value < 1:
        raise ValueError(f"--image_size={_IMAGE_SIZE.value} must be >= 1")
    if _EVALUATOR.value not in ("fid", "adm") and _INCEPTION.value:
        raise ValueError("--inception_weights is for --evaluator=fid or adm only: drop it")
    if _EVALUATOR.value != "fd_digits" and _CLASSIFIER.value:
        raise ValueError("--classifier is for --evaluator=fd_digits only: drop it")
    if _EVALUATOR.value != "fd_dinov2" and _DINOV2.value:
        raise ValueError("--dinov2_weights is for --evaluator=fd_dinov2 only: drop it")
    out = storage.as_path(_OUT.value)  # raises on an unsupported URL scheme
    if storage.isdir(out):
        raise ValueError(f"--out={_OUT.value} is a folder: give a file name, e.g. .../stats.npz")


def _check_images(shape: tuple[int, ...]) -> None:
    # The feature networks take fixed inputs; a mismatch would otherwise surface as a
    # parameter-shape traceback from inside flax.
    if _EVALUATOR.value == "fd_digits" and shape != (8, 8, 1):
        raise ValueError(
            f"--evaluator=fd_digits describes 8x8 grey digits, but --dataset={_DATASET.value} "
            f"has images of shape {shape}: use --evaluator=fid for other images"
        )
    if _EVALUATOR.value in ("fid", "adm") and (len(shape) != 3 or shape[-1] != 3):
        raise ValueError(
            f"--evaluator={_EVALUATOR.value} needs RGB images [H, W, 3], but "
            f"--dataset={_DATASET.value} has examples of shape {shape} (latents must be "
            "decoded to images first)"
        )
    if _EVALUATOR.value == "fd_dinov2" and (len(shape) != 3 or shape[-1] not in (1, 3)):
        raise ValueError(
            f"--evaluator=fd_dinov2 needs images [H, W, 3] or [H, W, 1], but --dataset="
            f"{_DATASET.value} has examples of shape {shape} (decode latents to images first)"
        )


def _description() -> str:
    parts = [f"{_DATASET.value} split={_SPLIT.value}"]
    for name, value in (
        ("path", _PATH.value),
        ("data_dir", _DATA_DIR.value),
        ("image_size", _IMAGE_SIZE.value),
    ):
        if value is not None:
            parts.append(f"{name}={value}")
    return " ".join(parts)


def main(argv: list[str]) -> None:
    """Builds the source and the evaluator, streams the statistics, writes ``--out``."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxdiff.parallel import initialize_distributed

    initialize_distributed()  # before other JAX calls; a lone process is left alone
    _check_flags()
    from jaxdiff.data import get_dataset
    from jaxdiff.metrics.streaming import feature_evaluator, reference_statistics
    from jaxdiff.parallel import is_main_process
    from jaxdiff.utils import storage
    from jaxdiff.utils.logs import quiet_library_logs

    quiet_library_logs()
    # The feature network first: a missing weights file is the likelier mistake, and
    # loading it is quicker than opening a large data set.
    if _EVALUATOR.value in ("fid", "adm"):
        evaluator = feature_evaluator("fid", inception_weights=_INCEPTION.value)
    elif _EVALUATOR.value == "fd_dinov2":
        evaluator = feature_evaluator("fd_dinov2", dinov2_weights=_DINOV2.value)
    else:
        evaluator = feature_evaluator("fd_digits", classifier=_CLASSIFIER.value)
    source = get_dataset(
        _DATASET.value,
        split=_SPLIT.value,
        data_dir=_DATA_DIR.value,
        path=_PATH.value,
        image_size=_IMAGE_SIZE.value,
    )
    _check_images(tuple(source.info.image_shape))
    if _EVALUATOR.value == "adm":
        from jaxdiff.metrics.adm_reference import make_adm_reference

        digest = make_adm_reference(
            source,
            _OUT.value,
            num=_NUM.value,
            inception_weights=_INCEPTION.value,
            batch_size=_BATCH.value,
        )
        if is_main_process():
            print(f"wrote ADM reference batch {storage.to_str(_OUT.value)}; SHA-256 {digest}")
        return
    stats = reference_statistics(
        source,
        evaluator,
        batch_size=_BATCH.value,
        num=_NUM.value,
        description=_description(),
    )
    if is_main_process():
        digest = stats.save(_OUT.value)
        print(
            f"wrote {storage.to_str(_OUT.value)}: {stats.evaluator} statistics "
            f"({stats.mu.shape[0]}-d {stats.feature}) of {stats.num} images of "
            f"{stats.source}; SHA-256 {digest}"
        )


if __name__ == "__main__":
    cli.run(main)
