"""Host input-pipeline throughput: decoded + augmented images/s through make_iterator.

Usage::

    python -m benchmarks.input_pipeline [--images=256] [--seconds=4] [--max_workers=N]
        [--write]
    python -m benchmarks.input_pipeline --smoke  # a few seconds; the numbers mean nothing

Builds, in a temporary folder,

* ``--images`` random-ish natural-looking JPEGs of 500x375 (ImageNet's typical size; smooth
  colour fields, edges and grain, about ImageNet's bytes per image), read with
  ``ImageFolderSource(image_size=256)`` (ADM's BOX/BICUBIC resize + center crop) and
  augmented with ``random_flip``;
* ``--latents`` float32 ``[32, 32, 4]`` latents with labels, as ``.npy`` (``NpySource``)
  and as ArrayRecord shards (``ArrayRecordSource``).

It prints the single-core decode rate (read + decode + crop of one file at a time, no
pipeline) and a markdown table of images/s through :func:`make_iterator` for each worker
count from 0 to ``--max_workers`` (default ``os.cpu_count()``). Worker start-up is left
out: each row times ``--seconds`` after the first batch. Rows also give images per
CPU-second (this process plus its workers, from /proc), which shared machines do not
distort, and the cores that would sustain ``--target`` images/s at that cost. ``--write``
appends the results, with the command, CPU, versions and date, to docs/benchmarks.md.

``--smoke`` runs every row at tiny size so the test suite can check the benchmark still
works: 8 JPEGs of 80x60 read at 48 px, 64 latents of ``[8, 8, 4]``, batch 8, 0.25 s per
row, 0 and 1 workers. It writes only to its temporary folder (``--write`` is refused).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter

from jaxdiff.data.arrays import NpySource
from jaxdiff.data.imagefolder import ImageFolderSource, load_image
from jaxdiff.data.pipeline import make_iterator, random_flip
from jaxdiff.data.shard_writer import write_arrays
from jaxdiff.data.shards import ArrayRecordSource
from jaxdiff.errors import InvalidArgumentError

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
# (JPEG width, height), pixels read, latent shape: ImageNet-like, and tiny for --smoke.
SIZES = ((500, 375), 256, (32, 32, 4))
SMOKE_SIZES = ((80, 60), 48, (8, 8, 4))


def _natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: colour field, shapes, blur, texture and sensor grain.

    The texture (noise at a third of the resolution, upsampled) and the grain put JPEG
    files at about ImageNet's ~110 KB per image, which is what sets the decode cost.
    """
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    low = rng.normal(0.0, 40.0, (3, height // 3 + 1, width // 3 + 1)).astype(np.float32)
    planes = [Image.fromarray(c, mode="F").resize((width, height), Image.BICUBIC) for c in low]
    texture = np.stack([np.asarray(p) for p in planes], axis=-1)
    noise = texture + rng.normal(0.0, 10.0, (height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def make_jpeg_folder(
    root: Path, count: int, seed: int = 0, size: tuple[int, int] = (500, 375)
) -> float:
    """Writes ``count`` JPEGs of ``size`` (quality 90) into two class folders.

    Returns:
        Mean file size in KiB.
    """
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.jpg"
        _natural_image(rng, *size).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def _cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its live children.

    Counting CPU time as well as wall time keeps the per-core figures meaningful on a
    shared machine, where other jobs take cores away from the benchmark.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [os.getpid(), *(p.pid for p in multiprocessing.active_children())]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # not Linux, or the child just exited
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def decode_rate(source: ImageFolderSource, seconds: float) -> tuple[float, float]:
    """``(images/s, images per CPU-second)`` of ``load_image`` on one thread, no pipeline."""
    load_image(source.file_path(0), source.image_size)  # warm the file cache and imports
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        load_image(source.file_path(done % len(source)), source.image_size)
        done += 1
    return done / (time.perf_counter() - start), done / (time.process_time() - cpu)


def pipeline_rate(source, *, batch: int, seconds: float, **kwargs) -> tuple[float, float]:
    """``(images/s, images per CPU-second)`` through make_iterator after the first batch.

    The first batch (worker start-up) is not timed; CPU time counts this process and the
    workers.
    """
    it = make_iterator(
        source, global_batch_size=batch, seed=0, process_index=0, process_count=1, **kwargs
    )
    try:
        next(it)
        done, start, cpu = 0, time.perf_counter(), _cpu_seconds()
        while time.perf_counter() - start < seconds:
            done += len(next(it)["image"])
        return done / (time.perf_counter() - start), done / (_cpu_seconds() - cpu)
    finally:
        it.close()


def _cores(cores: float) -> str:
    return f"{cores:.1f}" if cores >= 1 else f"{cores:.2g}"


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="JPEGs to generate")
    parser.add_argument("--latents", type=int, default=8192, help="latents to generate")
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per row")
    parser.add_argument("--max_workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--target", type=float, default=2500.0, help="images/s to feed (DiT-B/2 on an H100)"
    )
    parser.add_argument("--write", action="store_true", help="append to docs/benchmarks.md")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks the benchmark runs (see above)"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # smoke defaults; flags given explicitly still win
        if args.write:
            raise InvalidArgumentError(
                "--write appends to docs/benchmarks.md, but --smoke numbers measure nothing: "
                "drop --write (or --smoke)"
            )
        parser.set_defaults(images=8, latents=64, batch=8, seconds=0.25, max_workers=1)
        args = parser.parse_args(argv)
    (width, height), pixels, latent_shape = SMOKE_SIZES if args.smoke else SIZES
    workers = list(range(args.max_workers + 1))
    load_start = os.getloadavg()[0]
    rows: list[tuple[str, str, str, tuple[float, float]]] = []

    def add(row: tuple[str, str, str, tuple[float, float]]) -> None:
        rows.append(row)
        print(f"{row[0]}, workers {row[1]}, threads {row[2]}: {row[3][0]:,.0f} images/s, "
              f"{row[3][1]:,.0f} images per CPU-second", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="jaxdiff-input-bench-") as tmp:
        root = Path(tmp)
        kib = make_jpeg_folder(root / "jpeg", args.images, size=(width, height))
        jpegs = ImageFolderSource(root / "jpeg", image_size=pixels)
        add((f"JPEG {width}x{height} -> {pixels}: decode + crop only", "- (1 thread)", "-",
             decode_rate(jpegs, args.seconds)))  # fmt: skip
        for w in workers:
            for threads in [0, 8] if w == 0 else [0]:
                rates = pipeline_rate(
                    jpegs, batch=args.batch, seconds=args.seconds, augment=random_flip,
                    workers=w, threads=threads,
                )  # fmt: skip
                add((f"JPEG -> {pixels} + random_flip", str(w), str(threads), rates))

        # Already 256 px (e.g. a folder pre-resized once): decoding is all there is to do.
        make_jpeg_folder(root / "jpeg256", args.images, size=(pixels, pixels))
        small = ImageFolderSource(root / "jpeg256", image_size=pixels)
        square = f"JPEG {pixels}x{pixels} -> {pixels}"
        add((f"{square}: decode + crop only", "- (1 thread)", "-",
             decode_rate(small, args.seconds)))  # fmt: skip
        for w in sorted({0, args.max_workers}):
            rates = pipeline_rate(
                small, batch=args.batch, seconds=args.seconds, augment=random_flip, workers=w
            )
            add((f"{square} + random_flip", str(w), "0" if w else "8", rates))

        rng = np.random.default_rng(0)
        latents = rng.standard_normal((args.latents, *latent_shape), dtype=np.float32)
        labels = rng.integers(0, 1000, args.latents)
        (root / "npy").mkdir()
        np.save(root / "npy" / "images.npy", latents)
        np.save(root / "npy" / "labels.npy", labels)
        write_arrays(root / "ar", latents, labels, num_shards=4)
        kind = f"latents [{','.join(map(str, latent_shape))}] float32"
        for name, source in [
            (f"{kind}, NpySource", NpySource(root / "npy")),
            (f"{kind}, ArrayRecordSource", ArrayRecordSource(root / "ar")),
        ]:
            for w in workers:
                rates = pipeline_rate(source, batch=args.batch, seconds=args.seconds, workers=w)
                add((name, str(w), "8" if w == 0 else "0", rates))

    table = [
        f"| data | workers | threads/process | images/s | images per CPU-s | "
        f"cores for {args.target:,.0f}/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, w, threads, (rate, per_cpu) in rows:
        table.append(
            f"| {name} | {w} | {threads} | {rate:,.0f} | {per_cpu:,.0f} | "
            f"{_cores(args.target / per_cpu)} |"
        )
    flags = sys.argv[1:] if argv is None else argv
    command = "python -m benchmarks.input_pipeline " + " ".join(flags)
    header = (
        f"Command: `{command.strip()}` (global batch {args.batch}, {args.images} JPEGs of "
        f"{kib:.0f} KiB on average, files in the page cache). CPU: {_cpu_model()}, "
        f"{os.cpu_count()} cores, shared: load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end. Python {platform.python_version()}, numpy "
        f"{np.__version__}, Pillow {PIL.__version__}, grain {metadata.version('grain')}. "
        f"Date: {datetime.date.today().isoformat()}."
    )
    text = header + "\n\n" + "\n".join(table) + "\n"
    print("\n" + text)
    if args.write:
        with DOC.open("a") as f:
            f.write("\n### Input pipeline run\n\n" + text)
        print(f"appended to {DOC}")


if __name__ == "__main__":
    main()
