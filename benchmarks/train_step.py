"""Train-step speed, FLOPs, MFU, compile time and memory of the exact step training runs.

Usage::

    python -m benchmarks.train_step [--model dit-B/2] [--batch 256] [--precision bf16]
        [--remat none|dots|full] [--scan] [--steps 20] [--compare-scan]
        [--matmul-ceiling] [--pipeline-batches 20] [--json PATH] [--smoke]

``--model`` takes ``dit-S/2``, ``dit-B/2`` (``train/configs/dit_b2_latents.py``, 32x32x4
latents, 1,000 classes) or ``unet`` (``train/configs/cifar10_edm.py``, 32x32x3, 10
classes, with EDM's 9 augmentation labels), or a comma-separated list; run one model per
process for a per-model peak memory (the allocator's peak is per process). The step is
``jaxdiff.experiment.build_train_step(config, ...)``'s: the jitted, sharded step with the
state donated, under the config's precision and model options (``--remat``, ``--scan``
set ``config.model.remat`` and ``config.model.scan_blocks``), on all devices
(data-parallel, ``config.mesh``'s default). The timed calls run the executable of the cold
compile, i.e. the program ``bundle.step`` runs. The batch is random, non-zero data (images
N(0, 1), random labels and augmentation labels) placed on the devices once with the batch
sharding; the state is threaded through the timed calls as in training.

``--smoke`` runs tiny models (DiT depth 2, width 64 on 8x8x4; a one-level UNet with ch 16
on 8x8x3) with a batch of 8 and 2 timed steps, and turns on ``--compare-scan`` and
``--matmul-ceiling`` (256x256): it checks that every code path runs, its numbers measure
nothing.

Main table, per model:

* ``ms/step``: median wall time of one step (``--steps`` timed calls after one warm-up).
* ``images/s``: batch / step time.
* ``TFLOP/s``: model FLOPs per step / step time. Model FLOPs are 3 x the FLOPs of one
  forward pass (the backward pass costs about twice the forward), counted from the traced
  forward as 2 FLOPs per multiply-add of every matmul and convolution
  (``jaxdiff.utils.flops.count_flops``); elementwise work, the optimizer and
  rematerialised recomputation are not model FLOPs. (2 per multiply-add is twice the
  "GFLOPs" of the DiT paper, which counts multiply-adds: DiT-B/2 is 46.0 here, 23.0 there.)
* ``MFU (peak)``: TFLOP/s over the devices' dense bf16 peak (``device_peak_flops``: 989
  TFLOP/s per H100/H200) times the device count; n/a where the peak is unknown (CPU).
* ``MFU (matmul)``: TFLOP/s over a measured ceiling: a large matmul (8192^2; 1024^2 on a
  CPU) in the preset's compute dtype and matmul precision (bf16 for ``--precision bf16``;
  float32, i.e. TF32 on a recent GPU, for ``default``) timed on one device, times the
  device count (``--matmul-ceiling``, which also prints it against the datasheet bf16
  peak; n/a without it).
* ``GFLOP/img 3xfwd``: model FLOPs per image (above). ``GFLOP/img XLA``: XLA's
  ``cost_analysis()`` of the compiled per-device program times the device count, per
  image: the work all devices do, so it includes elementwise ops, the optimizer (repeated
  on every device for replicated params) and remat recomputation, and on GPU it leaves out
  the cuBLAS/cuDNN custom calls that do the matmuls. The ``XLA/3xfwd`` ratio is therefore
  above 1 on a CPU and far below 1 on a GPU. XLA counts a loop body once, so with
  ``--scan`` it counts one block of ``depth`` and the ratio drops below 1 on a CPU too.
* ``cold compile s``: ``lower + compile`` with an empty persistent cache (including the
  write of the cache entry); ``warm compile s``: the same after ``jax.clear_caches()``,
  served by the persistent cache as a restarted job's would be (the cache hit is checked;
  ``miss`` if it recompiled). Same process: XLA's in-memory GPU autotuning results from
  earlier compiles can shorten the cold number a little. See ``benchmarks/common.py``.
* ``peak mem``: the device allocator's peak so far (n/a on CPU); ``XLA mem/device``: XLA's
  estimate for the step program (arguments + outputs + temporaries, donated buffers once).
* ``cuDNN attn``: cuDNN fused-attention calls in the compiled step's HLO
  (``jaxdiff.models.cudnn_attention_calls``): on a GPU in bf16 a DiT step has two per
  block (forward and backward kernels); 0 means attention ran on the XLA path.

``Input pipeline vs step``: the real host pipeline (``build_data`` on the config's
synthetic dataset, or on random arrays of the model's shape written to a temporary
``npy`` dataset, with the config's augmentation) through ``prefetch_to_mesh``, as time per
global batch over ``--pipeline-batches`` batches (reading, augmenting and copying to the
devices, nothing else running), against the step time. A ratio below 1 means the host
keeps up with the step.

``--compare-scan`` (DiT): cold compile time and step time of the DiT step with its blocks
unrolled and under ``nn.scan`` (scanned compiles one block, so its compile time stops
growing with depth); the compile-time ratio is meaningful on a CPU too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from benchmarks.common import (
    CompileTimes,
    Table,
    batch_spec,
    compile_cold_and_warm,
    fmt,
    header_line,
    matmul_ceiling_flops,
    median_step_seconds,
    mib,
    model_config,
    peak_memory_bytes,
    report,
    xla_memory_bytes,
)
from jaxdiff.data.augment import AUGMENT_LABEL
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.builders import PRECISIONS, build_data
from jaxdiff.experiment.train import build_train_step, model_batch
from jaxdiff.models import REMAT_POLICIES, cudnn_attention_calls
from jaxdiff.parallel import batch_sharding, prefetch_to_mesh, put_global
from jaxdiff.utils.flops import count_flops, device_peak_flops, training_flops, xla_flops

SMOKE_BATCH, SMOKE_STEPS, SMOKE_MATMUL = 8, 2, 256


def configure(config: ml_collections.ConfigDict, args: argparse.Namespace, scan: bool) -> None:
    """Applies the command line's batch, precision and model options to ``config``."""
    config.train.batch_size = args.batch
    config.precision = args.precision
    config.model.remat = args.remat
    if config.model.name.lower().startswith("dit"):
        config.model.scan_blocks = scan


def random_batch(bundle: Any, batch_size: int, seed: int = 0) -> dict[str, jax.Array]:
    """Random non-zero inputs of the step, placed once with the batch sharding."""
    rng = np.random.default_rng(seed)
    host = {}
    for key, spec in batch_spec(bundle, batch_size).items():
        if key == "label":
            host[key] = rng.integers(0, bundle.num_classes, spec.shape).astype(spec.dtype)
        else:  # images ~ N(0, 1); augmentation labels too
            host[key] = rng.standard_normal(spec.shape, spec.dtype)
    return put_global(host, batch_sharding(bundle.mesh))


def forward_flops(bundle: Any, params: Any, batch: dict[str, Any]) -> int:
    """FLOPs (2 per multiply-add of dots and convs) of one training forward pass."""
    model = bundle.model
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, batch))
    params, batch = abstract
    sigma = jax.ShapeDtypeStruct(batch["image"].shape[:1], np.float32)

    def forward(params, batch, sigma):
        kwargs = {AUGMENT_LABEL: batch[AUGMENT_LABEL]} if AUGMENT_LABEL in batch else {}
        return model.apply(
            {"params": params},
            batch["image"],
            sigma,
            batch.get("label"),
            train=True,
            rngs={"dropout": jax.random.key(0)},
            **kwargs,
        )

    return int(count_flops(forward, params, batch, sigma))


@dataclasses.dataclass
class StepResult:
    """What one model's step measured (seconds, FLOPs and bytes; None = not available)."""

    name: str
    blocks: str
    step_s: float
    compile: CompileTimes
    model_flops: float
    xla_flops: float
    peak_bytes: int | None
    xla_bytes: int | None
    loss: float
    cudnn_calls: int


def measure_step(
    config: ml_collections.ConfigDict, classes: int, shape: tuple, args: Any, warm: bool = True
) -> tuple[StepResult, Any]:
    """Builds the step from ``config``, compiles it cold (and warm) and times it.

    The timed calls run the executable of the cold compile: the program ``bundle.step``
    runs (same function, shardings, donation and matmul precision), without a third
    compile.

    Returns:
        ``(StepResult, bundle)``.
    """
    bundle = build_train_step(config, classes, shape)
    state = jax.jit(bundle.init_fn, out_shardings=bundle.state_shardings)(jax.random.key(0))
    batch = random_batch(bundle, args.batch)
    key = jax.random.key(1)
    fwd = forward_flops(bundle, state.params, batch)
    with bundle.precision.scope():  # the step traces under the preset's matmul precision
        compiled = compile_cold_and_warm(bundle.jitted, state, batch, key, warm=warm)
        step_s, state, metrics = median_step_seconds(
            compiled.compiled, state, batch, key, warmup=1, repeats=args.steps
        )
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{config.model.name}: the benchmarked step's loss is {loss}")
    devices = bundle.mesh.devices.size
    xla = xla_flops(compiled.compiled)  # of the per-device program
    return StepResult(
        name=config.model.name,
        blocks="scanned" if config.model.get("scan_blocks", False) else "unrolled",
        step_s=step_s,
        compile=compiled,
        model_flops=float(training_flops(fwd)),
        xla_flops=float("nan") if xla is None else xla * devices,
        peak_bytes=peak_memory_bytes(),
        xla_bytes=xla_memory_bytes(compiled.compiled),
        loss=loss,
        cudnn_calls=cudnn_attention_calls(compiled.compiled.as_text()),
    ), bundle


def pipeline_seconds(
    config: ml_collections.ConfigDict, bundle: Any, num_batches: int, folder: str
) -> float:
    """Seconds per global batch of the host pipeline through ``prefetch_to_mesh``.

    Uses the config's dataset when it is synthetic and has the model's shape; otherwise
    random arrays of the model's shape are written to ``folder`` and read as ``npy``.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    synthetic = config.data.name == "synthetic_latents" and bundle.sample_shape == (32, 32, 4)
    if not synthetic:
        rng = np.random.default_rng(2)
        count = 4 * config.train.batch_size
        images = rng.uniform(-1, 1, (count, *bundle.sample_shape)).astype(np.float32)
        np.save(os.path.join(folder, "images.npy"), images)
        labels = rng.integers(0, max(bundle.num_classes, 1), count).astype(np.int32)
        np.save(os.path.join(folder, "labels.npy"), labels)
        config.data.name, config.data.path = "npy", folder
    _, data, _ = build_data(config)
    batches = prefetch_to_mesh(
        data, bundle.mesh, size=2, transform=lambda b: model_batch(b, bundle.num_classes)
    )
    try:
        batches.start_prefetch()
        for _ in range(2):  # pipeline start-up (workers, first transfers) is not timed
            jax.block_until_ready(next(batches))
        start = time.perf_counter()
        for _ in range(num_batches):
            jax.block_until_ready(next(batches))
        return (time.perf_counter() - start) / num_batches
    finally:
        batches.close()


def compare_scan(
    config: ml_collections.ConfigDict, classes: int, shape: tuple, args: Any, first: StepResult
) -> list[StepResult]:
    """The DiT step with blocks unrolled and scanned (``first`` is one of the two)."""
    other = ml_collections.ConfigDict(config.to_dict())
    other.model.scan_blocks = first.blocks == "unrolled"
    second, _ = measure_step(other, classes, shape, args, warm=False)
    return sorted([first, second], key=lambda r: r.blocks != "unrolled")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, with the ``--smoke`` defaults filled in and checked."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="comma-separated; default dit-B/2")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 256)")
    parser.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS))
    parser.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    parser.add_argument("--scan", action="store_true", help="DiT blocks under nn.scan")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20)")
    parser.add_argument("--compare-scan", action="store_true")
    parser.add_argument("--matmul-ceiling", action="store_true")
    parser.add_argument("--pipeline-batches", type=int, default=None, help="default 20")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny models, seconds on a CPU")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.model = args.model or ("dit-S/2,unet" if smoke else "dit-B/2")
    args.batch = args.batch or (SMOKE_BATCH if smoke else 256)
    args.steps = args.steps or (SMOKE_STEPS if smoke else 20)
    args.pipeline_batches = args.pipeline_batches or (SMOKE_STEPS if smoke else 20)
    if smoke:
        args.compare_scan = args.matmul_ceiling = True
    if min(args.batch, args.steps, args.pipeline_batches) < 1:
        raise InvalidArgumentError(
            f"--batch={args.batch}, --steps={args.steps} and --pipeline-batches="
            f"{args.pipeline_batches} must all be >= 1"
        )
    # A CPU takes minutes for an 8192^2 matmul; 1024^2 already fills its vector units.
    args.matmul_size = SMOKE_MATMUL if smoke else (1024 if jax.default_backend() == "cpu" else 8192)
    return args


def step_row(
    table: Table, name: str, args: Any, r: StepResult, devices: int, ceiling: float | None
) -> None:
    """Adds a model's row to the main table."""
    peak = device_peak_flops(jax.devices()[0].device_kind)
    flops_per_s = r.model_flops / r.step_s
    mfu_peak = flops_per_s / (peak * devices) if peak else None
    mfu_ceiling = flops_per_s / (ceiling * devices) if ceiling else None
    per_image = 1e-9 / args.batch
    table.add(
        [name, args.batch, args.precision, args.remat, r.blocks, r.step_s * 1e3,
         args.batch / r.step_s, flops_per_s / 1e12, _pct(mfu_peak), _pct(mfu_ceiling),
         r.model_flops * per_image, r.xla_flops * per_image, fmt(r.xla_flops / r.model_flops, 3),
         r.compile.cold_s, r.compile.warm_text(), mib(r.peak_bytes), mib(r.xla_bytes),
         r.cudnn_calls],
        record={"model": name, "batch": args.batch, "precision": args.precision,
                "remat": args.remat, "blocks": r.blocks, "step_s": r.step_s,
                "model_flops": r.model_flops, "xla_flops": r.xla_flops, "mfu_peak": mfu_peak,
                "mfu_matmul": mfu_ceiling, "cold_compile_s": r.compile.cold_s,
                "warm_compile_s": r.compile.warm_s, "warm_cache_hits": r.compile.warm_hits,
                "peak_bytes": r.peak_bytes, "xla_bytes": r.xla_bytes, "loss": r.loss,
                "cudnn_attention_calls": r.cudnn_calls},
    )  # fmt: skip


def matmul_table(size: int, dtype: Any, ceiling: float) -> Table:
    """The measured matmul ceiling against the device's datasheet peak."""
    peak = device_peak_flops(jax.devices()[0].device_kind)
    table = Table("Matmul ceiling", ["matmul", "TFLOP/s per device", "datasheet peak", "of peak"])
    name = jax.numpy.dtype(dtype).name
    table.add(
        [f"{name} {size}x{size} @ {size}x{size}", ceiling / 1e12,
         f"{peak / 1e12:,.0f}" if peak else "n/a", _pct(ceiling / peak) if peak else "n/a"],
        record={"size": size, "dtype": name, "flops": ceiling, "peak_flops": peak},
    )  # fmt: skip
    return table


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the benchmark; returns the printed text."""
    args = parse_args(argv)
    precision = PRECISIONS[args.precision]
    ceiling = None
    if args.matmul_ceiling:  # measured first, on an idle device
        with precision.scope():
            ceiling = matmul_ceiling_flops(args.matmul_size, precision.compute_dtype)
    main_table = Table(
        "Train step",
        ["model", "batch", "precision", "remat", "blocks", "ms/step", "images/s", "TFLOP/s",
         "MFU (peak)", "MFU (matmul)", "GFLOP/img 3xfwd", "GFLOP/img XLA", "XLA/3xfwd",
         "cold compile s", "warm compile s", "peak mem", "XLA mem/device", "cuDNN attn"],
    )  # fmt: skip
    pipe_table = Table(
        "Input pipeline vs step",
        ["model", "batch", "pipeline ms/batch", "pipeline images/s", "step ms", "pipeline/step"],
    )
    scan_table = Table(
        "DiT blocks unrolled vs scanned",
        ["model", "blocks", "cold compile s", "ms/step", "compile vs unrolled", "step vs unrolled"],
    )
    for name in [m.strip() for m in args.model.split(",") if m.strip()]:
        config, classes, shape = model_config(name, args.smoke)
        configure(config, args, args.scan)
        result, bundle = measure_step(config, classes, shape, args)
        step_row(main_table, name, args, result, bundle.mesh.devices.size, ceiling)
        with tempfile.TemporaryDirectory(prefix="jaxdiff-bench-data-") as folder:
            pipe_s = pipeline_seconds(config, bundle, args.pipeline_batches, folder)
        pipe_table.add(
            [name, args.batch, pipe_s * 1e3, args.batch / pipe_s, result.step_s * 1e3,
             pipe_s / result.step_s],
        )  # fmt: skip
        if args.compare_scan and name.startswith("dit"):
            pair = compare_scan(config, classes, shape, args, result)
            for r in pair:
                scan_table.add(
                    [name, r.blocks, r.compile.cold_s, r.step_s * 1e3,
                     fmt(r.compile.cold_s / pair[0].compile.cold_s, 3),
                     fmt(r.step_s / pair[0].step_s, 3)],
                    record={"model": name, "blocks": r.blocks, "cold_compile_s": r.compile.cold_s,
                            "step_s": r.step_s},
                )  # fmt: skip
    tables = [main_table, pipe_table] + ([scan_table] if scan_table.rows else [])
    if ceiling is not None:
        tables.append(matmul_table(args.matmul_size, precision.compute_dtype, ceiling))
    header = header_line("python -m benchmarks.train_step " + " ".join(argv or []))
    return report(header, tables, args.json)


def _pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


if __name__ == "__main__":
    import sys

    from jaxdiff.utils.cli import fail

    try:
        main(sys.argv[1:])
    except InvalidArgumentError as err:  # a bad flag: one line, exit code 2
        fail(str(err))
