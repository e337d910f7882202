r"""Converts an image folder into ArrayRecord shards: decode and crop once, train fast.

Usage::

    python -m jaxdiff.data.prepare --src data/imagenet/train --dst data/imagenet64 \\
        --image_size 64 [--num_shards 128] [--workers 16] [--skip_corrupt]

then train with ``--config.data.name=arrayrecord --config.data.path=data/imagenet64``.

Every image is decoded and center-cropped exactly as :class:`.imagefolder.ImageFolderSource` does
(ADM's recipe) and stored as uint8 pixels, in the folder's sorted order, with the class
labels; ``dataset.json`` keeps the class names (see :mod:`jaxdiff.data.shards`).

* **Parallel:** a process pool; each task writes one shard from a contiguous slice of
  the sorted file list. A progress bar counts images.
* **Resumable:** a shard is written under a temporary name and renamed when complete,
  then a small marker (``.prepare/<shard>.json``) records what it holds. Rerunning
  the same command keeps every shard whose marker matches (same source folder, file
  names, labels and size; file contents are not compared) and whose record count checks
  out, and redoes only the rest. ``dataset.json`` comes last.
* **Corrupt images:** an error naming the file; with ``--skip_corrupt`` they are left
  out, counted, printed at the end and listed in ``dataset.json``.
* **Cloud:** ``--dst gs://...`` works: array_record writes local files only, so each
  shard is written to a local temporary file and uploaded when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import queue as queue_lib
import sys
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

from jaxdiff.data import shard_writer, shards
from jaxdiff.data.imagefolder import (
    CorruptImageError,
    check_image_size,
    list_image_folder,
    load_image,
)
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.utils import storage

log = logging.getLogger(__name__)

MARKER_DIR = ".prepare"
#: Default shard size target: small enough for fast resume and many parallel tasks.
TARGET_SHARD_BYTES = 128 << 20
_REPORT_EVERY = 8  # images per progress message from a worker process


@dataclasses.dataclass(frozen=True)
class PrepareSummary:
    """What :func:`prepare_image_folder` produced.

    Attributes:
        path: The dataset folder.
        num_examples: Images written.
        num_shards: Shard files.
        reused_shards: Shards kept from an earlier, interrupted run.
        skipped: Unreadable source files left out (``skip_corrupt=True``).
    """

    path: str
    num_examples: int
    num_shards: int
    reused_shards: int
    skipped: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _ShardTask:
    """Everything a worker needs to write one shard (small and picklable)."""

    index: int
    num_shards: int
    root: str
    files: tuple[str, ...]
    labels: tuple[int, ...] | None
    image_size: int
    skip_corrupt: bool
    shard_file: str
    marker_file: str
    digest: str

    @property
    def features(self) -> list[shards.Feature]:
        s = self.image_size
        image = shards.Feature("image", (s, s, 3), "uint8", "uint8")
        return [image] if self.labels is None else [image, shards.Feature("label", (), "int32")]


def default_num_shards(num_examples: int, image_size: int) -> int:
    """About :data:`TARGET_SHARD_BYTES` of pixels per shard, at least 8 (for parallelism)."""
    total = num_examples * image_size * image_size * 3
    return max(1, min(num_examples, max(8, math.ceil(total / TARGET_SHARD_BYTES))))


def _digest(task_fields: dict[str, Any]) -> str:
    text = json.dumps({"version": shards.FORMAT_VERSION, **task_fields}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _marker(task: _ShardTask) -> dict[str, Any] | None:
    """The shard's marker if the shard is complete and matches this task, else ``None``."""
    from array_record.python import array_record_module

    if not (storage.exists(task.marker_file) and storage.exists(task.shard_file)):
        return None
    try:
        marker = json.loads(storage.read_text(task.marker_file))
    except json.JSONDecodeError:
        return None
    if marker.get("digest") != task.digest:
        return None
    if marker.get("skipped") and not task.skip_corrupt:
        return None  # redo it, so the unreadable file is reported as an error
    if storage.is_remote(task.shard_file):
        # Uploads are whole or nothing and the marker follows the upload, so both
        # existing is proof enough; this also keeps resuming free of array_record's own
        # GCS client (and its credentials).
        return marker
    reader = array_record_module.ArrayRecordReader(task.shard_file)
    try:  # a truncated file opens with ok() False and zero records
        complete = reader.ok() and reader.num_records() == marker.get("num_examples")
    finally:
        reader.close()
    return marker if complete else None


def _write_shard(task: _ShardTask, report: Callable[[int], None]) -> dict[str, Any]:
    """Decodes the task's images into its shard, then writes the marker; returns it."""
    # The old marker goes first: it must never vouch for a shard this run is replacing.
    storage.remove(task.marker_file)
    skipped: list[str] = []
    unreported = 0
    with shard_writer.ShardWriter(task.shard_file, task.features) as writer:
        for i, rel in enumerate(task.files):
            path = storage.join(task.root, rel)
            try:
                pixels = load_image(path, task.image_size)
            except CorruptImageError as err:
                if not task.skip_corrupt:
                    raise
                log.warning("skipping unreadable image %s (%s)", path, err.detail)
                skipped.append(path)
            else:
                values = {"image": pixels}
                if task.labels is not None:
                    values["label"] = task.labels[i]
                writer.write(**values)
            unreported += 1
            if unreported >= _REPORT_EVERY:
                report(unreported)
                unreported = 0
    report(unreported)
    marker = {"digest": task.digest, "num_examples": writer.num_written, "skipped": skipped}
    storage.write_text(task.marker_file, json.dumps(marker))
    return marker


# Set in each worker process by the pool initializer: progress goes back through it.
_PROGRESS_QUEUE: Any = None


def _init_worker(progress_queue: Any) -> None:
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = progress_queue


def _pool_task(task: _ShardTask) -> dict[str, Any]:
    return _write_shard(task, lambda n: _PROGRESS_QUEUE.put(n) if n else None)


def _mp_context() -> Any:
    """Picks fork when it is safe (fast: nothing re-imported), else forkserver or spawn.

    Forking a process whose JAX runtime has started can deadlock the child (JAX warns
    about it); the command-line tool never starts JAX, but notebooks and tests may. With
    forkserver or spawn, a calling script needs the ``if __name__ == "__main__":`` guard.
    """
    methods = multiprocessing.get_all_start_methods()
    bridge = sys.modules.get("jax._src.xla_bridge")
    if "fork" in methods and not getattr(bridge, "_backends", None):
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":  # import once in the server, not per worker
        ctx.set_forkserver_preload(["jaxdiff.data.prepare"])
    return ctx


def _run_parallel(
    tasks: Sequence[_ShardTask], workers: int, advance: Callable[[int], None]
) -> list[dict[str, Any]]:
    ctx = _mp_context()
    progress = ctx.Queue()

    def drain() -> None:
        while True:
            try:
                advance(progress.get_nowait())
            except queue_lib.Empty:
                return

    results: dict[int, dict[str, Any]] = {}
    error: BaseException | None = None
    with futures.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(progress,)
    ) as pool:
        pending = {pool.submit(_pool_task, task): task.index for task in tasks}
        while pending:
            done, _ = futures.wait(pending, timeout=0.2, return_when=futures.FIRST_COMPLETED)
            drain()
            for fut in done:
                index = pending.pop(fut)
                if fut.cancelled():
                    continue
                if fut.exception() is not None:
                    if error is None:
                        error = fut.exception()
                        # Unstarted shards are dropped; running ones finish, which a
                        # rerun then keeps.
                        for other in pending:
                            other.cancel()
                    continue
                results[index] = fut.result()
    drain()
    if error is not None:
        raise error
    return [results[task.index] for task in tasks]


def _remove_stale_temp_files(dst: str) -> None:
    if storage.is_remote(dst):  # cloud shards are uploaded whole: no partial objects
        return
    for name in storage.listdir(dst):
        if name.startswith(".shard-") and ".tmp-" in name:
            storage.remove(storage.join(dst, name))


def prepare_image_folder(
    src: storage.PathLike,
    dst: storage.PathLike,
    *,
    image_size: int,
    num_shards: int | None = None,
    workers: int | None = None,
    skip_corrupt: bool = False,
    progress: bool = True,
) -> PrepareSummary:
    """Converts an image folder into a prepared dataset of uint8 ArrayRecord shards.

    Args:
        src: Image folder (class subfolders or flat; local or ``gs://``).
        dst: Output folder (local or ``gs://``); created if needed. Rerunning with the
            same arguments resumes an interrupted run.
        image_size: Side of the square ADM center crops.
        num_shards: Shard files; default :func:`default_num_shards`.
        workers: Parallel processes; default the number of CPUs. ``1`` runs in this
            process.
        skip_corrupt: Leave unreadable images out (counted and listed) instead of
            raising.
        progress: Show a tqdm progress bar over images.

    Returns:
        A :class:`PrepareSummary`.

    Raises:
        CorruptImageError: For an unreadable image when ``skip_corrupt`` is ``False``
            (shards finished before it are kept for the rerun).
        InvalidArgumentError: For a bad folder or argument.

    Example::

        prepare_image_folder("data/flowers", "data/flowers64", image_size=64)
        source = ArrayRecordSource("data/flowers64")
    """
    image_size = check_image_size(image_size)
    root = storage.to_str(src)
    out = storage.to_str(dst)
    if out == root or out.startswith(root.rstrip("/") + "/"):
        # A rerun would list the output folder as a class folder without images.
        raise InvalidArgumentError(
            f"--dst {out} is inside --src {root}; write the prepared dataset elsewhere"
        )
    files, labels, classes = list_image_folder(root)
    n = len(files)
    num_shards = default_num_shards(n, image_size) if num_shards is None else num_shards
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if not isinstance(workers, int) or workers < 1:
        raise InvalidArgumentError(f"workers must be a positive integer, got {workers!r}")
    bounds = shards.shard_bounds(n, num_shards)
    storage.makedirs(storage.join(out, MARKER_DIR))
    # A rerun may change what the shards hold, so the old metadata goes before any shard
    # is touched: a folder without dataset.json is never mistaken for a dataset.
    storage.remove(storage.join(out, shards.METADATA_FILE))
    _remove_stale_temp_files(out)

    tasks = []
    for i, (start, stop) in enumerate(bounds):
        part = tuple(files[start:stop])
        part_labels = None if labels is None else tuple(int(x) for x in labels[start:stop])
        name = shards.shard_name(i, num_shards)
        # What the shard holds. skip_corrupt is left out: a shard finished without it has
        # every image, just what a run with it would write (markers list what was skipped).
        fields = {"i": i, "of": num_shards, "size": image_size, "src": root, "files": part}
        fields["labels"] = part_labels
        tasks.append(
            _ShardTask(
                index=i,
                num_shards=num_shards,
                root=root,
                files=part,
                labels=part_labels,
                image_size=image_size,
                skip_corrupt=bool(skip_corrupt),
                shard_file=storage.join(out, name),
                marker_file=storage.join(out, MARKER_DIR, name + ".json"),
                digest=_digest(fields),
            )
        )
    markers: dict[int, dict[str, Any]] = {}
    for task in tasks:
        marker = _marker(task)
        if marker is not None:
            markers[task.index] = marker
    todo = [task for task in tasks if task.index not in markers]
    done_images = sum(len(task.files) for task in tasks if task.index in markers)

    from tqdm.auto import tqdm

    with tqdm(
        total=n, initial=done_images, unit="img", desc="prepare", disable=not progress
    ) as bar:
        if workers == 1 or len(todo) <= 1:
            results = [_write_shard(task, bar.update) for task in todo]
        else:
            results = _run_parallel(todo, min(workers, len(todo)), bar.update)
    markers.update({task.index: marker for task, marker in zip(todo, results, strict=True)})

    skipped = [path for i in range(num_shards) for path in markers[i]["skipped"]]
    shard_writer.write_metadata(
        out,
        features=tasks[0].features,
        shards=[
            (shards.shard_name(i, num_shards), markers[i]["num_examples"])
            for i in range(num_shards)
        ],
        classes=classes,
        image_size=image_size,
        skipped=skipped,
        extra={"source": root, "encoder": "jaxdiff.data.prepare (ADM center crop)"},
    )
    return PrepareSummary(
        path=out,
        num_examples=sum(m["num_examples"] for m in markers.values()),
        num_shards=num_shards,
        reused_shards=num_shards - len(todo),
        skipped=tuple(skipped),
    )


def _define_flags() -> dict[str, Any]:
    from absl import flags

    return {
        "src": flags.DEFINE_string(
            "src", None, "Image folder (class subfolders or flat).", required=True
        ),
        "dst": flags.DEFINE_string("dst", None, "Output dataset folder.", required=True),
        "image_size": flags.DEFINE_integer("image_size", None, "Crop side.", required=True),
        "num_shards": flags.DEFINE_integer("num_shards", None, "Shard files (default: auto)."),
        "workers": flags.DEFINE_integer("workers", None, "Processes (default: all CPUs)."),
        "skip_corrupt": flags.DEFINE_bool(
            "skip_corrupt", False, "Skip unreadable images (counted) instead of failing."
        ),
        "progress": flags.DEFINE_bool("progress", True, "Show a progress bar."),
    }


def main(argv: Sequence[str], flag_values: dict[str, Any]) -> None:
    """Runs the command with parsed flags; prints a one-paragraph summary."""
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    values = {key: holder.value for key, holder in flag_values.items()}
    summary = prepare_image_folder(values.pop("src"), values.pop("dst"), **values)
    print(
        f"wrote {summary.num_examples} images in {summary.num_shards} shards to "
        f"{summary.path} ({summary.reused_shards} shards kept from an earlier run)"
    )
    print(f"skipped {len(summary.skipped)} unreadable images")
    for path in summary.skipped[:20]:
        print(f"  {path}")
    if len(summary.skipped) > 20:
        print(f"  ... (all {len(summary.skipped)} listed in {shards.METADATA_FILE})")


if __name__ == "__main__":
    from jaxdiff.utils import cli

    _FLAGS = _define_flags()
    cli.run(lambda argv: main(argv, _FLAGS))
