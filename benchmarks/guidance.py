"""NFE and wall time per guidance method, same sampler and model; AG's saving vs CFG.

Usage::

    python -m benchmarks.guidance                      # exact 2-D Gaussian mixture
    python -m benchmarks.guidance --workdir=runs/digits  # also a trained digits run
    python -m benchmarks.guidance --smoke [--workdir=runs/digits]  # a quick check on a CPU

On the mixture (3 classes in 2-D, exact denoisers and classifiers, ``tests/mixture.py``)
every method samples the same noise and labels with the same solver. The table reports
network evaluations per sample (from ``aux["nfe"]``), compile time, the median wall time
of a jitted sampling call, the sliced Wasserstein distance (SWD) of the samples to exact
samples of the class-conditional distributions (averaged over classes), and the mean L2
distance to the CFG samples drawn from the same noise. A second table sweeps Adaptive
Guidance's threshold: NFE saving vs CFG and distance to CFG.

PAG/SLG on the mixture use the fixture's stand-in "perturbed network" (a blurrier
denoiser); on a trained UNet/DiT they use the real ``variant="pag"/"slg"`` passes.

``--smoke`` runs at tiny size so the test suite can check that the benchmark still works
(its numbers mean nothing): 48 mixture samples, 16 digits, 4 steps, one timed call after
the compiling one, three AG thresholds. Every mixture method runs; on a run, only the
methods that use the network differently (one pass, cond + uncond, adaptive switching,
the PAG and SLG variants) are sampled, since each costs a compile of seconds on a CPU and
the others only recombine the same passes. Any run will do, e.g. a 5-step one.
``--skip_mixture`` leaves out the mixture tables (to time a run's methods alone).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.guidance import (
    ag,
    apg,
    autoguidance,
    cfg,
    cfg_zero_star,
    cfgpp,
    classifier_guidance,
    elucd,
    gfcg,
    interval,
    minority,
    pag,
    rescale,
    slg,
    within_interval,
)
from jaxdiff.samplers import get_solver, sample
from jaxdiff.utils.rng import per_sample_keys
from tests import mixture as mx  # the exact mixture of the tests (run from the repo root)

W = 2.0
AG_THRESHOLDS = (0.95, 0.98, 0.99, 0.995, 0.999)
# --smoke on a run: a method for each distinct way of calling the network (see above).
SMOKE_DIGITS_METHODS = (
    "none (conditional)",
    "cfg:2",
    "ag:2,threshold=0.99",
    "pag:3,scale=2",
    "slg:2.8,scale=2",
)


def mixture_methods():
    bad = mx.denoiser(s=0.9)
    return {
        "none (conditional)": None,
        "cfg:2": cfg(W),
        "interval:2,sigma_lo=0.28,sigma_hi=1.61": interval(W),
        "interval:2,sigma_lo=0.3,sigma_hi=5": interval(W, 0.3, 5.0),
        "rescale:2,phi=0.7": rescale(W),
        "apg:2 (eta=0,beta=-0.5,r=2.5)": apg(W),
        "ag:2,threshold=0.99": ag(W),
        "autoguidance:2 (bad model s=0.9)": autoguidance(W, guide_denoise=bad),
        "classifier:1 (exact, on uncond)": classifier_guidance(1.0, log_prob_fn=mx.log_prob),
        "elucd:0.05 (clean classifier)": elucd(0.05, logits_fn=mx.clean_logits),
        "gfcg:1 (clean classifier)": gfcg(1.0, logits_fn=mx.clean_logits),
        "gfcg:1 + autoguidance:2": gfcg(
            1.0, logits_fn=mx.clean_logits, autoguide=autoguidance(W, guide_denoise=bad)
        ),
        "minority:1,target=2 (exact)": minority(1.0, log_prob_fn=mx.log_prob, target=2),
        "cfgpp:0.6": cfgpp(0.6),
        "cfg_zero_star:2": cfg_zero_star(W),
        "pag:3 (stand-in perturbation)": pag(3.0),
        "slg:2.8,scale=2 (stand-in)": slg(2.8, scale=W),
        "interval(apg:2) 0.3..5": within_interval(apg(W), 0.3, 5.0),
    }


def timed(fn, *args, repeats=3):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return out, compile_s, float(np.median(times)) if times else float("nan")


def swd_to_truth(x, labels, key):
    truth = np.asarray(mx.samples(key, labels))
    return float(
        np.mean([mx.sliced_wasserstein(x[labels == k], truth[labels == k]) for k in range(mx.K)])
    )


def run_mixture(num, steps, solver_name, repeats=3, thresholds=AG_THRESHOLDS):
    labels = np.arange(num, dtype=np.int32) % mx.K
    noise = jax.random.normal(jax.random.key(0), (num, 2))
    c, u = jnp.asarray(labels), jnp.full((num,), mx.NULL, jnp.int32)
    sigmas = karras_sigmas(steps)
    solver = get_solver(solver_name)
    den = mx.denoiser()

    def sampler(guidance):
        return jax.jit(
            lambda n: sample(den, n, sigmas, solver=solver, guidance=guidance, cond=c, uncond=u)
        )

    rows, ref = [], None
    for name, g in mixture_methods().items():
        (x, aux), comp, wall = timed(sampler(g), noise, repeats=repeats)
        x = np.asarray(x)
        if name == "cfg:2":
            ref = x
        rows.append(
            [name, int(aux["nfe"]), comp, wall * 1e3, swd_to_truth(x, labels, jax.random.key(1)), x]
        )
    lines = [
        f"| method | NFE/sample | compile (s) | wall (ms, {num} samples) "
        "| SWD to p(x|c) | L2 to CFG |",
        "|---|---|---|---|---|---|",
    ]
    for name, nfe, comp, wall, swd, x in rows:
        l2 = float(np.mean(np.linalg.norm(x - ref, axis=1)))
        lines.append(f"| `{name}` | {nfe} | {comp:.2f} | {wall:.1f} | {swd:.3f} | {l2:.3f} |")

    ag_lines = [
        "| AG threshold | NFE/sample | CFG NFE | saving | switch after (guided calls) "
        "| mean L2 to CFG | SWD(AG, CFG) |",
        "|---|---|---|---|---|---|---|",
    ]
    (x_cfg, a_cfg), _, _ = timed(sampler(cfg(W)), noise, repeats=0)
    nfe_cfg = int(a_cfg["nfe"])
    for thr in thresholds:
        (x_ag, a_ag), _, _ = timed(sampler(ag(W, thr)), noise, repeats=0)
        nfe = int(a_ag["nfe"])
        l2 = float(np.mean(np.linalg.norm(np.asarray(x_ag) - np.asarray(x_cfg), axis=1)))
        swd = mx.sliced_wasserstein(x_ag, x_cfg)
        ag_lines.append(
            f"| {thr} | {nfe} | {nfe_cfg} | {1 - nfe / nfe_cfg:.1%} | "
            f"{int(a_ag['guidance_state'].n_guided)} | {l2:.4f} | {swd:.4f} |"
        )
    return "\n".join(lines), "\n".join(ag_lines)


def run_digits(workdir, num, steps, solver_name, repeats=3, only=None):
    from jaxdiff.experiment import load_run
    from jaxdiff.generate import make_generate_fn

    run = load_run(workdir)
    labels = jnp.asarray(np.arange(num) % max(run.num_classes, 1), jnp.int32)
    keys = per_sample_keys(jax.random.key(0), num)
    methods = {
        "none (conditional)": None,
        "cfg:2": cfg(W),
        "interval:2": interval(W),
        "rescale:2,phi=0.7": rescale(W),
        "apg:2": apg(W),
        "ag:2,threshold=0.99": ag(W),
        "cfgpp:0.6": cfgpp(0.6),
        "cfg_zero_star:2": cfg_zero_star(W),
        "pag:3,scale=2": pag(3.0, scale=W),
        "slg:2.8,scale=2": slg(2.8, scale=W),
    }
    lines = [
        f"| method | NFE/sample | compile (s) | wall (ms, {num} samples) | L2 to CFG |",
        "|---|---|---|---|---|",
    ]
    ref, rows = None, []
    for name, g in methods.items():
        if only is not None and name not in only:
            continue
        fn = jax.jit(
            make_generate_fn(
                run.model,
                run.formulation,
                solver=get_solver(solver_name),
                sigmas=karras_sigmas(steps),
                guidance=g,
                sample_shape=run.sample_shape,
                num_classes=run.num_classes,
            )
        )
        try:
            (x, aux), comp, wall = timed(fn, run.params, labels, keys, repeats=repeats)
        except ValueError as err:  # e.g. a variant the network lacks
            lines.append(f"| `{name}` | n/a ({err}) | | | |")
            continue
        x = np.asarray(x).reshape(num, -1)
        ref = x if name == "cfg:2" else ref
        rows.append((name, int(aux["nfe"]), comp, wall, x))
    for name, nfe, comp, wall, x in rows:
        l2 = float(np.mean(np.linalg.norm(x - ref, axis=1)))
        lines.append(f"| `{name}` | {nfe} | {comp:.2f} | {wall * 1e3:.1f} | {l2:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=4096, help="samples (mixture)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--solver", default="euler", help="euler keeps CFG++ meaningful")
    p.add_argument("--workdir", default=None, help="a trained digits run (optional)")
    p.add_argument("--digits_num", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the compiling one")
    p.add_argument("--skip_mixture", action="store_true", help="only the --workdir table")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (fewer methods on a run): checks the benchmark runs, measures nothing",
    )
    args = p.parse_args(argv)
    if args.skip_mixture and not args.workdir:
        p.error("--skip_mixture leaves nothing to run: also pass --workdir=RUN")
    if args.smoke:  # smoke defaults; flags given explicitly still win
        p.set_defaults(num=48, steps=4, digits_num=16, repeats=1)
        args = p.parse_args(argv)
    print(f"# jax {jax.__version__}, devices: {jax.devices()[0].platform} x{jax.device_count()}")
    print(f"# solver {args.solver}, {args.steps} Karras steps, w = {W} where a CFG scale applies\n")
    thresholds = AG_THRESHOLDS[::2] if args.smoke else AG_THRESHOLDS
    if not args.skip_mixture:
        table, ag_table = run_mixture(args.num, args.steps, args.solver, args.repeats, thresholds)
        print("## 2-D Gaussian mixture (exact denoisers)\n")
        print(table)
        print("\n## Adaptive Guidance vs CFG (same noise)\n")
        print(ag_table)
    if args.workdir:
        only = SMOKE_DIGITS_METHODS if args.smoke else None
        print(f"\n## Trained run {args.workdir}\n")
        print(
            run_digits(args.workdir, args.digits_num, args.steps, args.solver, args.repeats, only)
        )


if __name__ == "__main__":
    main()
