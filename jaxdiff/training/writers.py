"""Metric writers shaped like ``clu.metric_writers`` (which needs TensorFlow), and progress.

* :class:`LoggingWriter`: one log line per call, ``step 100 | loss 0.123 | steps_per_s 5.1``.
* :class:`JsonlWriter`: ``metrics.jsonl`` (one ``{"step": ..., name: value}`` object per
  line), PNGs under ``images/`` and ``hparams.json`` next to it.
* :class:`TensorBoardWriter`: tensorboardX, used only when it is installed.
* :class:`MultiWriter`: fans out to several writers.

:func:`create_default_writer` picks these for process 0 and logging only for the others;
:func:`progress` gives a tqdm bar in a terminal and periodic log lines on pods.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jaxdiff.utils import storage
from jaxdiff.utils.images import make_grid

logger = logging.getLogger(__name__)


@runtime_checkable
class MetricWriter(Protocol):
    """What the train loop writes metrics through.

    Images are ``uint8`` or float in ``[0, 1]``, shaped ``[H, W]``, ``[H, W, C]`` (C in
    {1, 3, 4}) or ``[N, H, W, C]`` (tiled into one grid); build grids from ``[-1, 1]``
    samples with :func:`jaxdiff.utils.make_grid`.
    """

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes scalar metrics (Python floats, numpy or jax scalars) for ``step``."""
        ...

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Writes named images for ``step``."""
        ...

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Writes the run's (JSON-able, possibly nested) hyper-parameters once."""
        ...

    def flush(self) -> None:
        """Pushes buffered output to its destination."""
        ...

    def close(self) -> None:
        """Flushes and releases files."""
        ...


def _format_value(value: Any) -> str:
    if isinstance(value, int | np.integer):
        return str(int(value))
    return f"{float(value):.5g}"


def _as_hwc_uint8(name: str, image: np.ndarray) -> np.ndarray:
    """Validates one image and returns it as ``uint8 [H, W, C]``."""
    image = np.asarray(image)
    if image.ndim == 4:  # A batch: tile it, mapping [0, 1] to make_grid's [-1, 1].
        image = make_grid(_as_unit_float(name, image) * 2.0 - 1.0)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image {name!r} must be [H, W], [H, W, C] with C in (1, 3, 4) or [N, H, W, C], "
            f"got shape {image.shape}"
        )
    if image.dtype == np.uint8:
        return image
    return np.round(_as_unit_float(name, image) * 255.0).astype(np.uint8)


def _as_unit_float(name: str, image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    image = np.asarray(image, np.float32)
    lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
    # Silently clipping a [-1, 1] or [0, 255] image would write a plausible but wrong
    # picture, so out-of-range floats are an error that says how to convert.
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(
            f"float image {name!r} must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]. "
            "Pass uint8, or map [-1, 1] samples with (x + 1) / 2 or jaxdiff.utils.make_grid."
        )
    return np.clip(np.nan_to_num(image), 0.0, 1.0)


def _safe_name(name: str) -> str:
    # Names like "samples/ema" must not create directories or odd file names.
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class LoggingWriter:
    """Writes metrics as log lines through :mod:`logging` (absl logging shows them too).

    Args:
        prefix: optional text put before each line, e.g. ``"train"``.
        level: logging level of the lines.
    """

    def __init__(self, prefix: str = "", level: int = logging.INFO):
        self._prefix = f"{prefix} | " if prefix else ""
        self._level = level

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Logs ``step S | name value | ...``."""
        parts = [f"step {int(step)}"] + [f"{k} {_format_value(v)}" for k, v in scalars.items()]
        logger.log(self._level, "%s%s", self._prefix, " | ".join(parts))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Logs only the names and shapes of the images."""
        shapes = ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in images.items())
        logger.log(self._level, "%sstep %d | images %s", self._prefix, int(step), shapes)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Logs the hyper-parameters as one JSON line."""
        text = json.dumps(dict(hparams), sort_keys=True, default=str)
        logger.log(self._level, "%shparams %s", self._prefix, text)

    def flush(self) -> None:
        """Nothing to flush: logging handlers write immediately."""

    def close(self) -> None:
        """Nothing to release."""


class JsonlWriter:
    """Appends scalars to a JSONL file; images become PNGs next to it.

    Appending (not truncating) keeps the history of a run that was resumed; a reader
    should keep the last record per step. Non-finite values are written as Python's
    ``NaN``/``Infinity`` tokens, which ``json.loads`` and pandas read back.

    Local files get each line at once (for ``tail -f`` and crash safety). Object stores
    cannot append, so for a cloud path (``gs://...``) the whole file is uploaded again at
    most every ``upload_every`` seconds and on :meth:`flush`/:meth:`close` (the training
    loop flushes at every checkpoint), keeping the upload traffic small.

    Args:
        path: the JSONL file, e.g. ``workdir/metrics.jsonl`` (local or ``gs://``); parents
            are created. Images go to ``<dir>/images/<name>_<step>.png``, hparams to
            ``<dir>/hparams.json``.
        upload_every: seconds between uploads of a cloud file.
    """

    def __init__(self, path: str | os.PathLike, *, upload_every: float = 60.0):
        self.path = storage.to_str(path)
        self.directory = storage.to_str(storage.as_path(self.path).parent)
        storage.makedirs(self.directory)
        self._remote = storage.is_remote(self.path)
        self._upload_every = upload_every
        self._closed = False
        if self._remote:
            self._text = storage.read_text(self.path) if storage.exists(self.path) else ""
            self._dirty, self._uploaded = False, time.monotonic()
        else:
            self._file = open(self.path, "a", encoding="utf-8")  # Closed in close().

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends ``{"step": step, **scalars}`` as one line."""
        if self._closed:
            raise ValueError(f"write to closed JsonlWriter({self.path})")
        record: dict[str, Any] = {"step": int(step)}
        for key, value in scalars.items():
            record[key] = int(value) if isinstance(value, int | np.integer) else float(value)
        line = json.dumps(record) + "\n"
        if not self._remote:
            self._file.write(line)
            self._file.flush()  # Each line is complete on disk, for tail -f and crash safety.
            return
        self._text += line
        self._dirty = True
        if time.monotonic() - self._uploaded >= self._upload_every:
            self.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Writes each image as ``images/<name>_<step>.png``."""
        import io

        from PIL import Image

        for name, image in images.items():
            pixels = _as_hwc_uint8(name, image)
            if pixels.shape[-1] == 1:
                pixels = pixels[..., 0]  # Pillow wants [H, W] for greyscale.
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            path = storage.join(self.directory, "images", f"{_safe_name(name)}_{int(step)}.png")
            storage.write_bytes(path, buf.getvalue())

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Writes ``hparams.json`` (replacing an older one)."""
        text = json.dumps(dict(hparams), indent=2, sort_keys=True, default=str)
        storage.write_text(storage.join(self.directory, "hparams.json"), text)

    def flush(self) -> None:
        """Flushes the JSONL file (uploads it, for a cloud path)."""
        if self._closed:
            return
        if not self._remote:
            self._file.flush()
        elif self._dirty:
            storage.write_text(self.path, self._text)
            self._dirty, self._uploaded = False, time.monotonic()

    def close(self) -> None:
        """Flushes and closes the JSONL file; later writes raise ``ValueError``."""
        self.flush()
        if not self._remote:
            self._file.close()
        self._closed = True


class TensorBoardWriter:
    """Writes to TensorBoard event files through tensorboardX (no TensorFlow needed).

    Args:
        logdir: directory for the event files.

    Raises:
        ImportError: if tensorboardX is not installed (``pip install tensorboardX``).
    """

    def __init__(self, logdir: str | os.PathLike):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=os.fspath(logdir))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Adds one scalar summary per entry."""
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(value), global_step=int(step))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Adds one HWC image summary per entry."""
        for name, image in images.items():
            pixels = _as_hwc_uint8(name, image)
            self._writer.add_image(name, pixels, global_step=int(step), dataformats="HWC")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Adds the hyper-parameters as a JSON text summary (nested dicts kept whole)."""
        text = json.dumps(dict(hparams), indent=2, sort_keys=True, default=str)
        self._writer.add_text("hparams", f"```\n{text}\n```", global_step=0)

    def flush(self) -> None:
        """Flushes the event file."""
        self._writer.flush()

    def close(self) -> None:
        """Closes the event file."""
        self._writer.close()


class MultiWriter:
    """Sends every call to each of ``writers``, in order.

    Args:
        writers: the writers to fan out to.
    """

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Forwards to every writer."""
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Forwards to every writer."""
        for writer in self.writers:
            writer.write_images(step, images)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Forwards to every writer."""
        for writer in self.writers:
            writer.write_hparams(hparams)

    def flush(self) -> None:
        """Flushes every writer."""
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        """Closes every writer."""
        for writer in self.writers:
            writer.close()


def create_default_writer(
    workdir: str | os.PathLike, *, just_logging: bool = False, tensorboard: bool = True
) -> MetricWriter:
    """The writer a training run uses, as ``clu.metric_writers.create_default_writer``.

    Args:
        workdir: run directory; gets ``metrics.jsonl``, ``images/`` and ``hparams.json``
            (and TensorBoard event files).
        just_logging: log lines only and no files; pass ``jax.process_index() > 0`` so
            only process 0 writes.
        tensorboard: also write TensorBoard events when tensorboardX is importable.

    Returns:
        A :class:`MultiWriter`, or a :class:`LoggingWriter` when ``just_logging``.
    """
    if just_logging:
        return LoggingWriter()
    writers: list[MetricWriter] = [
        LoggingWriter(),
        JsonlWriter(storage.join(workdir, "metrics.jsonl")),
    ]
    if storage.is_remote(workdir):
        # tensorboardX reaches buckets through its own cloud clients, not the storage
        # layer, so bucket runs log to metrics.jsonl only (documented in docs/scaling.md).
        tensorboard = False
    if tensorboard and importlib.util.find_spec("tensorboardX") is not None:
        writers.append(TensorBoardWriter(workdir))
    return MultiWriter(writers)


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class ProgressBar:
    """Progress of a run: a tqdm bar, periodic log lines, or nothing.

    Args:
        total_steps: the step the run ends at.
        initial_step: the step it starts (or resumes) from.
        mode: ``"tqdm"``, ``"log"``, ``"off"``, or ``"auto"``: tqdm on process 0 when
            stderr is a terminal or in a notebook, log lines on process 0 otherwise
            (pods, CI, files), off on other processes.
        log_every_s: in ``"log"`` mode, the least number of seconds between lines.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        *,
        mode: str = "auto",
        log_every_s: float = 60.0,
    ):
        if mode == "auto":
            import jax

            if jax.process_index() != 0:
                mode = "off"
            else:
                # Notebooks (Colab) render tqdm.auto as a widget though stderr is no tty.
                interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
                mode = "tqdm" if interactive else "log"
        if mode not in ("tqdm", "log", "off"):
            raise ValueError(f"mode must be 'auto', 'tqdm', 'log' or 'off', got {mode!r}")
        self.mode = mode
        self.total_steps = int(total_steps)
        self.step = self._start_step = int(initial_step)
        self._log_every_s = log_every_s
        self._start_time = self._last_log = time.monotonic()
        self._bar = None
        if mode == "tqdm":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps, initial=self.step, unit="step")

    def update(self, step: int, **postfix: Any) -> None:
        """Reports that the run has reached ``step`` (an absolute step, not an increment).

        Args:
            step: the current step; the bar never moves backwards.
            **postfix: values shown next to the bar, e.g. ``loss=0.12``.
        """
        step = int(step)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _format_value(v) for k, v in postfix.items()})
            self._bar.update(max(0, step - self.step))
        self.step = max(self.step, step)
        now = time.monotonic()
        if self.mode == "log" and (
            now - self._last_log >= self._log_every_s or self.step >= self.total_steps
        ):
            self._last_log = now
            logger.info("%s", self._line(now, postfix))

    def _line(self, now: float, postfix: Mapping[str, Any]) -> str:
        done = self.step - self._start_step
        rate = done / max(now - self._start_time, 1e-9)
        eta = (self.total_steps - self.step) / rate if rate > 0 else math.inf
        pct = 100.0 * self.step / max(self.total_steps, 1)
        parts = [f"step {self.step}/{self.total_steps} ({pct:.1f}%)", f"{rate:.3g} steps/s"]
        parts += [f"ETA {_format_duration(eta)}"]
        parts += [f"{k} {_format_value(v)}" for k, v in postfix.items()]
        return " | ".join(parts)

    def close(self) -> None:
        """Closes the tqdm bar (if any)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def progress(total_steps: int, initial_step: int = 0, **kwargs: Any) -> ProgressBar:
    """Creates a :class:`ProgressBar` (``mode="auto"`` unless given in ``kwargs``).

    Args:
        total_steps: the step the run ends at.
        initial_step: the step it starts (or resumes) from.
        **kwargs: ``mode`` and ``log_every_s``, as for :class:`ProgressBar`.

    Returns:
        The progress bar; call ``update(step, loss=...)`` and finally ``close()``.
    """
    return ProgressBar(total_steps, initial_step, **kwargs)
