"""Cold and warm compile time of the train step, for models too big to run here.

Usage::

    python -m benchmarks.compile_time [--model dit-XL/2,unet] [--batch 256]
        [--precision bf16] [--remat none] [--smoke]

Compiles the exact step training runs (``jaxdiff.experiment.build_train_step``: jitted,
sharded over all devices, state donated) from abstract shapes only: no parameter, optimizer
state or batch is ever allocated, so DiT-XL/2's step compiles on a machine that could not
hold its 11 GB of state. Each DiT is compiled twice, with its blocks unrolled and under
``nn.scan`` (``config.model.scan_blocks``). Columns:

* ``cold compile s``: ``lower + compile`` with an empty persistent cache;
* ``warm compile s``: the same served by the persistent compilation cache, as a restarted
  job's compile is (``miss`` if the cache was not hit);
* ``XLA mem/device``: XLA's memory estimate of the compiled step;
* ``cuDNN attn``: cuDNN fused-attention calls in the compiled HLO (0 off GPU).

Compile time depends on the backend: XLA:CPU numbers show the scanned/unrolled ratio,
not what a GPU or TPU compile costs. ``--smoke`` compiles the tiny benchmark models.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax

from benchmarks.common import (
    Table,
    batch_spec,
    compile_cold_and_warm,
    header_line,
    mib,
    model_config,
    report,
    xla_memory_bytes,
)
from benchmarks.train_step import configure
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.builders import PRECISIONS
from jaxdiff.experiment.train import StepBundle, build_train_step
from jaxdiff.models import REMAT_POLICIES, cudnn_attention_calls
from jaxdiff.parallel import batch_sharding


def abstract_args(bundle: StepBundle, batch_size: int) -> tuple:
    """ShapeDtypeStructs (with shardings) of the step's state, batch and key."""

    def with_sharding(shape, sharding):
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)

    state = jax.eval_shape(bundle.init_fn, jax.random.key(0))
    state = jax.tree.map(with_sharding, state, bundle.state_shardings)
    sharding = batch_sharding(bundle.mesh)
    batch = {k: with_sharding(v, sharding) for k, v in batch_spec(bundle, batch_size).items()}
    return state, batch, jax.random.key(1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line with the ``--smoke`` defaults filled in."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="comma-separated; default dit-XL/2,unet")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 256)")
    parser.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS))
    parser.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny models, seconds on a CPU")
    args = parser.parse_args(argv)
    args.model = args.model or ("dit-S/2,unet" if args.smoke else "dit-XL/2,unet")
    args.batch = args.batch or (8 if args.smoke else 256)
    if args.batch < 1:
        raise InvalidArgumentError(f"--batch={args.batch} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the benchmark; returns the printed text."""
    args = parse_args(argv)
    table = Table(
        "Train-step compile time",
        ["model", "blocks", "batch", "precision", "remat", "cold compile s", "warm compile s",
         "XLA mem/device", "cuDNN attn"],
    )  # fmt: skip
    for name in [m.strip() for m in args.model.split(",") if m.strip()]:
        layouts = (False, True) if name.startswith("dit") else (None,)
        for scan in layouts:
            config, classes, shape = model_config(name, args.smoke)
            configure(config, args, bool(scan))  # scan only matters for a DiT
            bundle = build_train_step(config, classes, shape)
            with bundle.precision.scope():
                times = compile_cold_and_warm(bundle.jitted, *abstract_args(bundle, args.batch))
            blocks = "-" if scan is None else ("scanned" if scan else "unrolled")
            table.add(
                [name, blocks, args.batch, args.precision, args.remat, times.cold_s,
                 times.warm_text(), mib(xla_memory_bytes(times.compiled)),
                 cudnn_attention_calls(times.compiled.as_text())],
                record={"model": name, "blocks": blocks, "batch": args.batch,
                        "cold_compile_s": times.cold_s, "warm_compile_s": times.warm_s,
                        "warm_cache_hits": times.warm_hits},
            )  # fmt: skip
    header = header_line("python -m benchmarks.compile_time " + " ".join(argv or []))
    return report(header, [table], args.json)


if __name__ == "__main__":
    import sys

    from jaxdiff.utils.cli import fail

    try:
        main(sys.argv[1:])
    except InvalidArgumentError as err:  # a bad flag: one line, exit code 2
        fail(str(err))
