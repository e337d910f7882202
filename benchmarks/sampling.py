"""Sampling speed: Heun vs one network evaluation, sampler overhead, guidance cost and NFE.

Usage::

    python -m benchmarks.sampling [--model unet] [--batches 1,64,1024]
        [--guidance-batch 64] [--precision default|bf16] [--repeats 5] [--json PATH]
        [--smoke]

The model is ``train/configs/cifar10_edm.py``'s UNet (32x32x3, 10 classes; ``--model
dit-S/2`` or ``dit-B/2`` takes the latent DiT instead, ``--model digits`` the small 8x8x1
UNet of README command 1, which a CPU samples at batch 256) with randomly initialised params:
speed does not depend on the weights' values, so no checkpoint is needed. What guidance
*decides* can depend on them (see Adaptive Guidance below). Every sampler is
``jax.jit(make_generate_fn(...))``, called as users call it (``generate(params, labels,
keys)``: start noise, the scan over steps, guidance), on one device. The noise levels are
``karras_sigmas(N)`` over the config's ``sample.sigma_min/sigma_max/rho`` (0.002, 80, 7
for the UNet). ``--smoke`` uses a one-level UNet with ch 16 on 8x8x3, one batch of 2 and
one timed call, and still prints every row (its numbers measure nothing).

Sampler table, per batch: ``forward`` is one jitted denoiser call (one network
evaluation, preconditioning included); ``Euler, 1 step`` is a whole one-step generation
(the cost of a one-step distilled generator); ``Heun, 18 steps`` is EDM's deterministic
sampler (35 evaluations: the last step is an Euler step). Columns: ``NFE`` (network
evaluations per sample, from the sampler's ``aux["nfe"]``), ``ms/call`` (median of
``--repeats`` timed calls after a warm-up), ``images/s`` and ``compile s`` (lower +
compile, informational: a persistent compilation cache, if enabled, shortens it).

Derived table, per batch: ``sampler overhead`` = t(Heun) / (NFE x t(forward)), the cost
of everything but the network (1.0 = none), and ``one-step / Heun images/s``, the
speed-up a one-step generator buys at that batch.

Guidance table, at ``--guidance-batch`` (default: the largest batch, at most 64), Heun 18
steps, scale 2.0 throughout: no guidance (the conditional model), CFG (``cfg(2.0)``: 2
evaluations per call), Adaptive Guidance (``ag(2.0, threshold=0.99)``, the reference
node's default: CFG until the batch-wide cosine of the conditional and unconditional
outputs reaches 0.99, then 1 evaluation) and the guidance interval (``interval(2.0,
sigma_lo=0.28, sigma_hi=1.61)``, EDM2's window: CFG only for sigma in (0.28, 1.61]).
``NFE`` is measured, so it shows what each method really skipped. The interval's NFE
depends only on the schedule. AG's depends on the model: a random UNet barely uses its
label, so its outputs agree at once and AG switches almost immediately; a trained model
switches later (the paper reports about 25% fewer evaluations than CFG).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from benchmarks.common import Table, fmt, header_line, median_seconds, model_config, report
from jaxdiff.diffusion import karras_sigmas
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.builders import (
    PRECISIONS,
    build_formulation,
    build_model,
    build_precision,
)
from jaxdiff.generate import class_conditions, make_generate_fn, model_denoiser
from jaxdiff.guidance import ag, cfg, interval
from jaxdiff.samplers import euler, heun
from jaxdiff.training.state import init_params_fn
from jaxdiff.utils.rng import per_sample_keys

HEUN_STEPS = 18
GUIDANCE_SCALE = 2.0
SMOKE_BATCH = 2


@dataclasses.dataclass
class Setup:
    """The benchmarked network: module, formulation, random params and sample settings."""

    model: nn.Module
    formulation: Any
    params: Any
    precision: Any
    num_classes: int
    sample_shape: tuple[int, ...]
    sigma_min: float
    sigma_max: float
    rho: float

    def sigmas(self, steps: int) -> Any:
        """``karras_sigmas(steps)`` over the config's noise range."""
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)


@dataclasses.dataclass
class Measured:
    """One timed sampler call: NFE per sample, median seconds and compile seconds."""

    nfe: int
    seconds: float
    compile_s: float


def build_setup(name: str, smoke: bool, precision: str) -> Setup:
    """Builds the model of ``name``'s config with random params (seed 0)."""
    config, classes, shape = model_config(name, smoke)
    config.precision = precision
    model = build_model(config, classes)
    params = jax.jit(init_params_fn(model, shape, classes))(jax.random.key(0))
    sc = config.sample
    return Setup(
        model=model,
        formulation=build_formulation(config),
        params=nn.unbox(params),
        precision=build_precision(config),
        num_classes=classes,
        sample_shape=tuple(shape),
        sigma_min=float(sc.sigma_min),
        sigma_max=float(sc.sigma_max),
        rho=float(sc.rho),
    )


def inputs(setup: Setup, batch: int) -> tuple[Any, Any]:
    """Random labels and per-sample keys for a batch."""
    rng = np.random.default_rng(batch)
    labels = rng.integers(0, max(setup.num_classes, 1), batch).astype(np.int32)
    return jax.numpy.asarray(labels), per_sample_keys(jax.random.key(1), batch)


def _compile(jitted: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def measure_generate(
    setup: Setup, solver: Any, steps: int, guidance: Any, batch: int, repeats: int
) -> Measured:
    """Compiles and times ``jax.jit(make_generate_fn(...))`` at ``batch``."""
    generate = make_generate_fn(
        setup.model,
        setup.formulation,
        solver=solver,
        sigmas=setup.sigmas(steps),
        guidance=guidance,
        sample_shape=setup.sample_shape,
        num_classes=setup.num_classes,
    )
    labels, keys = inputs(setup, batch)
    with setup.precision.scope():  # float32 matmul precision of the preset, as training
        compiled, compile_s = _compile(jax.jit(generate), setup.params, labels, keys)
    images, aux = compiled(setup.params, labels, keys)
    if not bool(np.all(np.isfinite(np.asarray(images)))):
        raise FloatingPointError(f"non-finite samples from {type(solver).__name__}")
    nfe = int(np.max(np.asarray(aux["nfe"])))
    seconds = median_seconds(compiled, setup.params, labels, keys, warmup=0, repeats=repeats)
    return Measured(nfe, seconds, compile_s)


def measure_forward(setup: Setup, batch: int, repeats: int) -> Measured:
    """Compiles and times one jitted denoiser evaluation at ``batch`` (sigma = 1)."""

    def forward(params, x, sigma, labels):
        cond, _ = class_conditions(labels, setup.num_classes)
        return model_denoiser(setup.model, setup.formulation, params)(x, sigma, cond)

    labels, _ = inputs(setup, batch)
    x = jax.random.normal(jax.random.key(2), (batch, *setup.sample_shape))
    sigma = jax.numpy.ones((batch,))
    with setup.precision.scope():
        compiled, compile_s = _compile(jax.jit(forward), setup.params, x, sigma, labels)
    seconds = median_seconds(compiled, setup.params, x, sigma, labels, warmup=1, repeats=repeats)
    return Measured(1, seconds, compile_s)


def guidance_methods() -> dict[str, Any]:
    """The compared guidance settings (standard values; see the module docstring)."""
    return {
        "none (conditional)": None,
        f"cfg:{GUIDANCE_SCALE}": cfg(GUIDANCE_SCALE),
        f"ag:{GUIDANCE_SCALE},threshold=0.99": ag(GUIDANCE_SCALE, threshold=0.99),
        f"interval:{GUIDANCE_SCALE},sigma_lo=0.28,sigma_hi=1.61": interval(
            GUIDANCE_SCALE, sigma_lo=0.28, sigma_hi=1.61
        ),
    }


def parse_batches(text: str) -> list[int]:
    """``"1,64,1024"`` -> ``[1, 64, 1024]``, each >= 1."""
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise InvalidArgumentError(
            f"--batches={text!r} must be comma-separated positive integers, e.g. 1,64,1024"
        )
    return batches


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the benchmark; returns the printed text."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="unet", help="unet, digits, dit-S/2 or dit-B/2")
    parser.add_argument("--batches", default=None, help="comma-separated (default 1,64,1024)")
    parser.add_argument("--guidance-batch", type=int, default=None)
    parser.add_argument("--precision", default="default", choices=sorted(PRECISIONS))
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny UNet, seconds on a CPU")
    args = parser.parse_args(argv)
    smoke = args.smoke
    batches = parse_batches(args.batches or (str(SMOKE_BATCH) if smoke else "1,64,1024"))
    repeats = args.repeats or (1 if smoke else 5)
    guide_batch = args.guidance_batch or max([b for b in batches if b <= 64] or [min(batches)])
    if repeats < 1 or guide_batch < 1:
        raise InvalidArgumentError(
            f"--repeats={repeats} and --guidance-batch={guide_batch} must be >= 1"
        )
    setup = build_setup(args.model, smoke, args.precision)

    samplers = Table("Samplers", ["sampler", "batch", "NFE", "ms/call", "images/s", "compile s"])
    derived = Table(
        "Sampler overhead and one-step speed-up",
        ["batch", "sampler overhead t(Heun)/(NFE x t(forward))", "one-step / Heun images/s"],
    )
    heun_runs = {}
    for batch in batches:
        runs = {
            "forward (1 evaluation)": measure_forward(setup, batch, repeats),
            "Euler, 1 step": measure_generate(setup, euler(), 1, None, batch, repeats),
            f"Heun, {HEUN_STEPS} steps": measure_generate(
                setup, heun(), HEUN_STEPS, None, batch, repeats
            ),
        }
        for name, m in runs.items():
            samplers.add([name, batch, m.nfe, m.seconds * 1e3, batch / m.seconds, m.compile_s])
        fwd, one, full = runs.values()
        heun_runs[batch] = full
        overhead, speedup = full.seconds / (full.nfe * fwd.seconds), full.seconds / one.seconds
        derived.add(
            [batch, fmt(overhead, 3), fmt(speedup, 1)],
            record={"batch": batch, "overhead": overhead, "one_step_speedup": speedup},
        )

    guided = Table(
        f"Guidance, Heun {HEUN_STEPS} steps, scale {GUIDANCE_SCALE}",
        ["guidance", "batch", "NFE", "ms/call", "images/s", "NFE vs CFG", "time vs CFG"],
    )
    results = {}
    for name, method in guidance_methods().items():
        if method is None and guide_batch in heun_runs:
            results[name] = heun_runs[guide_batch]  # the same program, already measured
        else:
            results[name] = measure_generate(
                setup, heun(), HEUN_STEPS, method, guide_batch, repeats
            )
    ref = results[f"cfg:{GUIDANCE_SCALE}"]
    for name, m in results.items():
        guided.add(
            [name, guide_batch, m.nfe, m.seconds * 1e3, guide_batch / m.seconds,
             fmt(m.nfe / ref.nfe, 3), fmt(m.seconds / ref.seconds, 3)],
            record={"guidance": name, "batch": guide_batch, "nfe": m.nfe, "seconds": m.seconds,
                    "compile_s": m.compile_s},
        )  # fmt: skip

    header = header_line("python -m benchmarks.sampling " + " ".join(argv or []))
    header += f" | model {args.model} (random init), precision {args.precision}"
    return report(header, [samplers, derived, guided], args.json)


if __name__ == "__main__":
    import sys

    from jaxdiff.utils.cli import fail

    try:
        main(sys.argv[1:])
    except InvalidArgumentError as err:  # a bad flag: one line, exit code 2
        fail(str(err))
