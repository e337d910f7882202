"""Helpers shared by the benchmarks: timing, compile timing, memory, headers and tables.

Timing: :func:`median_seconds` runs a function ``warmup`` times, then ``repeats`` timed
calls, each waited for with :func:`jax.block_until_ready`, and returns the median, so one
slow call (a page fault, another process) does not move the result.

Compile time: :func:`compile_cold_and_warm` lowers and compiles a jitted function twice
with a fresh, empty persistent compilation cache: the first compile is cold (nothing
cached; it also writes the cache entry), the second, after :func:`jax.clear_caches`
emptied every in-memory cache, is served by the persistent cache, as a restarted job's
would be. JAX's ``/jax/compilation_cache/cache_hits`` event is counted to prove it; a
second compile that did not hit the cache is reported as ``miss``.

Numbers that do not exist on a device (peak memory on the CPU, MFU without a known peak)
are printed as ``n/a``. :func:`model_config` gives the benchmark models' experiment
configs (and the tiny ``--smoke`` versions) to both benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.data.augment import AUGMENT_LABEL
from jaxdiff.errors import InvalidArgumentError

MODELS = ("dit-S/2", "dit-B/2", "dit-L/2", "dit-XL/2", "unet", "digits")
"""Benchmark models: DiT sizes on 32x32x4 latents, the CIFAR-10 EDM UNet and the digits
UNet of README command 1 (8x8x1, sized for CPU measurements)."""
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_CACHE_OPTIONS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
    "jax_enable_compilation_cache",
)


def model_config(name: str, smoke: bool) -> tuple[ml_collections.ConfigDict, int, tuple]:
    """The experiment config of a benchmark model, its class count and sample shape."""
    from train.configs import cifar10_edm, digits, dit_b2_latents

    if name not in MODELS:
        raise InvalidArgumentError(
            f"unknown --model {name!r}: choose from {', '.join(MODELS)} (comma-separated)"
        )
    if name.startswith("dit"):
        config, classes, shape = dit_b2_latents.get_config(), 1000, (32, 32, 4)
        config.model.name = name
        if smoke:  # a 2-block, 64-wide DiT on 8x8x4: every code path, seconds to compile
            config.model.name = "dit"
            config.model.update(patch_size=2, hidden_size=64, depth=2, num_heads=2)
            classes, shape = 10, (8, 8, 4)
    elif name == "digits":  # README command 1's UNet on 8x8x1: CPU-sized, real shapes
        config, classes, shape = digits.get_config(), 10, (8, 8, 1)
    else:
        config, classes, shape = cifar10_edm.get_config(), 10, (32, 32, 3)
        if smoke:  # one 8x8 level with attention: every block type, a fraction of the compile
            config.model.update(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,))
            shape = (8, 8, 3)
    return config, classes, shape


def median_seconds(fn: Callable[..., Any], *args: Any, warmup: int = 1, repeats: int = 10) -> float:
    """Median wall time in seconds of ``fn(*args)`` over ``repeats`` calls after a warm-up.

    Args:
        fn: a jitted function or compiled executable (must not donate ``args``).
        *args: its arguments.
        warmup: untimed calls first (the first call of a jitted function compiles).
        repeats: timed calls, each waited for with ``jax.block_until_ready``.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1: pass e.g. repeats=10")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def median_step_seconds(
    step: Callable[..., tuple[Any, Any]],
    state: Any,
    *args: Any,
    warmup: int = 1,
    repeats: int = 10,
) -> tuple[float, Any, Any]:
    """Median seconds of ``state, out = step(state, *args)`` with the state threaded through.

    The state is donated by a train step, so each call consumes the previous call's output
    exactly as a training loop does.

    Returns:
        ``(median seconds, final state, last output)``.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1: pass e.g. --steps=10")
    out = None
    for _ in range(warmup):
        state, out = jax.block_until_ready(step(state, *args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, out = jax.block_until_ready(step(state, *args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), state, out


@contextlib.contextmanager
def fresh_compile_cache() -> Iterator[str]:
    """A new, empty persistent compilation cache for the block; the old settings after it.

    Every compile is cached (no minimum compile time or size), so even a small program's
    second compile is a cache load. The previous cache settings (e.g. a test session's
    cache) are restored afterwards and the temporary folder is deleted.
    """
    from jax.experimental.compilation_cache import compilation_cache

    from jaxdiff.utils.compile_cache import enable_compile_cache

    saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    with tempfile.TemporaryDirectory(prefix="jaxdiff-bench-cache-") as path:
        try:
            compilation_cache.reset_cache()  # the cache object binds its folder once
            enable_compile_cache(path)  # also caches every program, however quick or small
            jax.config.update("jax_enable_compilation_cache", True)
            yield path
        finally:
            compilation_cache.reset_cache()
            for name, value in saved.items():
                jax.config.update(name, value)


@dataclasses.dataclass
class CompileTimes:
    """Cold and cache-served compile times of one program.

    Attributes:
        compiled: the executable of the cold compile.
        cold_s: lower + compile seconds with an empty persistent cache.
        warm_s: lower + compile seconds served by the persistent cache (None if not
            measured).
        warm_hits: persistent-cache hits during the warm compile (0 = it recompiled).
    """

    compiled: Any
    cold_s: float
    warm_s: float | None
    warm_hits: int

    def warm_text(self) -> str:
        """The warm compile time for a table, or ``miss`` when the cache did not serve it."""
        if self.warm_s is None:
            return "n/a"
        return f"{self.warm_s:.2f}" if self.warm_hits > 0 else "miss"


def compile_cold_and_warm(jitted: Any, *args: Any, warm: bool = True) -> CompileTimes:
    """Compiles ``jitted(*args)`` cold, then again from the persistent cache (see module doc).

    Args:
        jitted: a ``jax.jit`` object (``.lower(*args).compile()`` is timed).
        *args: example arguments (arrays or ShapeDtypeStructs with shardings).
        warm: also time the cache-served second compile.
    """
    hits = []

    def listener(event: str, **kwargs: Any) -> None:
        del kwargs
        if event == CACHE_HIT_EVENT:
            hits.append(1)

    with fresh_compile_cache():
        jax.clear_caches()
        start = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        cold = time.perf_counter() - start
        warm_s = None
        if warm:
            jax.clear_caches()  # drop the in-memory executables: only the disk cache is left
            jax.monitoring.register_event_listener(listener)
            try:
                start = time.perf_counter()
                jitted.lower(*args).compile()
                warm_s = time.perf_counter() - start
            finally:
                jax.monitoring.unregister_event_listener(listener)
    return CompileTimes(compiled=compiled, cold_s=cold, warm_s=warm_s, warm_hits=len(hits))


def peak_memory_bytes(devices: Sequence[Any] | None = None) -> int | None:
    """The largest ``peak_bytes_in_use`` over ``devices`` (default: local devices).

    This is the allocator's peak since the process started, so benchmark one model per
    process for a per-model number. None where the runtime keeps no statistics (CPU).
    """
    peaks = []
    for device in devices if devices is not None else jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def xla_memory_bytes(compiled: Any) -> int | None:
    """XLA's per-device memory estimate of a compiled program: arguments + outputs + temps.

    Donated (aliased) buffers are counted once. None when the backend gives no analysis.
    """
    try:
        mem = compiled.memory_analysis()
    except Exception:  # some backends raise instead of returning None
        return None
    if mem is None:
        return None
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return int(total - mem.alias_size_in_bytes)


def matmul_ceiling_flops(size: int = 8192, dtype: Any = jnp.bfloat16, repeats: int = 10) -> float:
    """Measured FLOP/s of one ``size x size`` matmul in ``dtype`` on the default device.

    A practical ceiling for MFU: what the device's matmul units deliver on a large, ideal
    dense matmul (2 size^3 FLOPs per call), under the caller's matmul precision.
    """
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    seconds = median_seconds(matmul, a, b, warmup=2, repeats=repeats)
    return 2.0 * size**3 / seconds


def header_line(title: str) -> str:
    """``title`` with the device kind x count, backend, jax/flax versions and the date."""
    devices = jax.devices()
    return (
        f"{title} | device: {devices[0].device_kind} x{len(devices)} "
        f"({jax.default_backend()}) | jax {jax.__version__}, flax {flax.__version__} | "
        f"{datetime.date.today().isoformat()}"
    )


def fmt(value: Any, digits: int | None = None) -> str:
    """A table cell: None or NaN -> ``n/a``, numbers with thousands separators.

    Floats get ``digits`` decimals; by default 2, or 3 significant digits below 1 (a tiny
    smoke model's 0.000123 GFLOP/image would otherwise print as 0.00).
    """
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    if digits is None:
        if value != 0 and abs(value) < 1:
            return f"{value:.3g}"
        digits = 2
    return f"{value:,.{digits}f}"


def mib(num_bytes: int | None) -> str:
    """Bytes as ``MiB`` text (``n/a`` for None)."""
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:,.1f} MiB"


@dataclasses.dataclass
class Table:
    """A markdown table: a title, column names and rows of preformatted cells.

    ``records`` keeps the raw values of each row (for ``--json``).
    """

    title: str
    columns: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def add(self, cells: Sequence[Any], record: dict[str, Any] | None = None) -> None:
        """Adds a row (cells formatted with :func:`fmt` unless already text)."""
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells, table {self.title!r} has "
                             f"{len(self.columns)} columns")  # fmt: skip
        self.rows.append([fmt(c) for c in cells])
        raw = dict(zip(self.columns, cells, strict=True)) if record is None else record
        self.records.append(raw)

    def markdown(self) -> str:
        """The table as markdown, with a ``### title`` line above it."""
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def report(header: str, tables: Sequence[Table], json_path: str | None = None) -> str:
    """Prints the header and the tables; writes ``{header, tables}`` to ``json_path``."""
    text = "\n\n".join([header, *(t.markdown() for t in tables)])
    print(text, flush=True)
    if json_path:
        payload = {
            "header": header,
            "tables": {t.title: t.records for t in tables},
        }
        directory = os.path.dirname(os.path.abspath(json_path))
        os.makedirs(directory, exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(_clean(payload), f, indent=2, default=str)
    return text


def _clean(value: Any) -> Any:
    """JSON-safe values: numpy scalars as Python numbers, NaN as null."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextlib.contextmanager
def smoke_workdir(workdir: str | None) -> Iterator[str]:
    """Yields ``workdir``, or (if None) a tiny digits run trained into a temporary folder.

    The run is the test suite's tiny digits config (``tests/tiny.py``, 5 steps of a UNet
    with 8 channels): seconds to train on a CPU, and enough to exercise every code path a
    benchmark takes with a real run. The folder is removed on exit.
    """
    if workdir is not None:
        yield workdir
        return
    from jaxdiff.experiment import train_and_evaluate
    from tests.tiny import tiny_config  # run from the repo root, like tests.mixture

    with tempfile.TemporaryDirectory(prefix="jaxdiff-smoke-run-") as tmp:
        print(f"# --smoke: training a 5-step tiny digits run in {tmp}", flush=True)
        train_and_evaluate(tiny_config(5), tmp)
        yield tmp


def batch_spec(bundle: Any, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of the train step's global batch (what ``model_batch`` keeps).

    ``image`` always; ``label`` for a conditional model; ``augment_label`` when the
    network takes augmentation labels (``augment_dim > 0``).
    """
    spec = {"image": jax.ShapeDtypeStruct((batch_size, *bundle.sample_shape), np.float32)}
    if bundle.num_classes > 0:
        spec["label"] = jax.ShapeDtypeStruct((batch_size,), np.int32)
    augment_dim = int(getattr(bundle.model, "augment_dim", 0) or 0)
    if augment_dim > 0:
        spec[AUGMENT_LABEL] = jax.ShapeDtypeStruct((batch_size, augment_dim), np.float32)
    return spec


def save_labelled_rows(rows: Sequence[np.ndarray], names: Sequence[str], out: str) -> None:
    """Saves one grid row per ``rows[i]`` (``[n, H, W, C]`` in [-1, 1]), named on the left."""
    from PIL import Image, ImageDraw

    from jaxdiff.utils.images import make_grid, upscale

    grid = upscale(make_grid(np.concatenate(rows), nrow=len(rows[0])), 4)
    label_w = 260
    canvas = Image.new("RGB", (grid.shape[1] + label_w, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    cell = grid.shape[0] / len(rows)
    for i, name in enumerate(names):
        draw.text((6, int(i * cell + cell / 2) - 6), name, fill="black")
    canvas.save(out)


def append_jsonl(path: str | None, rows: Sequence[dict[str, Any]]) -> None:
    """Appends ``rows`` to ``path`` as JSON lines (nothing when ``path`` is None)."""
    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
