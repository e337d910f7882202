"""Train-step and sampling throughput, compile time, FLOPs and NFE for a trained run's model.

Usage::

    python -m benchmarks.throughput --workdir=runs/digits [--batch=64] [--sample_batch=100]

Prints a markdown table (paste it into docs/benchmarks.md with the device and date).
FLOPs: the train step's come from XLA's ``cost_analysis()`` of the compiled step (on GPU it
leaves out cuBLAS/cuDNN custom calls: compile on CPU to cross-check, see
specs/performance.md); a forward pass is a third of it, and a sampler costs a forward pass
per network evaluation (XLA counts a scan body only once). MFU needs the device's peak and
is not reported on CPU.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.experiment import load_run
from jaxdiff.generate import make_generate_fn
from jaxdiff.guidance import cfg
from jaxdiff.samplers import euler, heun
from jaxdiff.training import create_train_state, make_optimizer, make_train_step
from jaxdiff.utils.rng import per_sample_keys


def _compile(jitted, *args):
    """Returns (compiled executable, compile seconds, XLA FLOPs of one call)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled, seconds, float(cost.get("flops", float("nan")))


def _seconds_per_call(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sample_batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    run = load_run(args.workdir)
    rows = []

    tx = make_optimizer(1e-3)
    state = create_train_state(run.params, tx, (0.999,))
    step = jax.jit(
        make_train_step(run.model, run.formulation, tx, num_classes=run.num_classes,
                        label_dropout=0.1)
    )  # fmt: skip
    batch = {
        "image": jnp.zeros((args.batch, *run.sample_shape)),
        "label": jnp.arange(args.batch) % max(run.num_classes, 1),
    }
    key = jax.random.key(0)
    compiled, compile_s, flops = _compile(step, state, batch, key)
    dt = _seconds_per_call(compiled, state, batch, key, repeats=args.repeats)
    rows.append(("train step", args.batch, "-", args.batch / dt, compile_s, flops / args.batch))
    forward_flops = flops / args.batch / 3.0  # a train step is ~3 forward passes

    labels = jnp.arange(args.sample_batch) % max(run.num_classes, 1)
    keys = per_sample_keys(jax.random.key(1), args.sample_batch)
    settings = [
        ("Heun 18 steps + CFG 2.0", heun(), karras_sigmas(18), cfg(2.0)),
        ("Heun 18 steps, no guidance", heun(), karras_sigmas(18), None),
        ("Euler 1 step (one-step cost)", euler(), karras_sigmas(1), None),
    ]
    for name, solver, sigmas, guidance in settings:
        gen = jax.jit(
            make_generate_fn(
                run.model,
                run.formulation,
                solver=solver,
                sigmas=sigmas,
                guidance=guidance,
                sample_shape=run.sample_shape,
                num_classes=run.num_classes,
            )
        )
        compiled, compile_s, _ = _compile(gen, run.params, labels, keys)
        nfe = int(compiled(run.params, labels, keys)[1]["nfe"])
        reps = max(1, args.repeats // 5)
        dt = _seconds_per_call(compiled, run.params, labels, keys, repeats=reps)
        # XLA counts a scan body once, so sampler FLOPs are the forward pass times the NFE.
        rows.append((f"sample: {name}", args.sample_batch, nfe, args.sample_batch / dt, compile_s,
                     forward_flops * nfe))  # fmt: skip

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    print("| what | batch | NFE | images/s | compile s | GFLOP/image |")
    print("|---|---|---|---|---|---|")
    for name, b, nfe, ips, comp, fl in rows:
        print(f"| {name} | {b} | {nfe} | {ips:,.1f} | {comp:.1f} | {fl / 1e9:.3f} |")


if __name__ == "__main__":
    main()
