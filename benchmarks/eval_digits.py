"""FD-digits, precision/recall, density/coverage and class accuracy of a digits run.

Usage::

    python -m benchmarks.eval_digits --workdir=/tmp/r3 --num=2000
    python -m benchmarks.eval_digits --smoke  # seconds on a CPU; the numbers mean nothing

For each sampler setting it draws ``--num`` class-conditional samples (labels cycle
0..9, sample ``j`` seeded by ``fold_in(key(seed), j)``) with
:func:`jaxdiff.experiment.sample_and_evaluate` and reports the ``fd_digits`` evaluator's
metrics against the digits ``"train"`` split. ``FD@297`` recomputes FD-digits on the
first 297 samples, the size of the held-out ``"test"`` split, so the generated rows can
be compared with the real-data reference row (FD-digits is biased upwards at small N).
The reference row evaluates the held-out test digits themselves. Prints a Markdown table
(and JSON lines with ``--jsonl``).

``--smoke`` runs the same code at tiny size so the test suite can check the benchmark
still works: 24 samples for each of two settings at 2 steps, on ``--workdir`` or (without
one) a 5-step tiny digits run trained into a temporary folder (:func:`smoke_workdir`).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax

from benchmarks.common import append_jsonl, smoke_workdir
from jaxdiff.data import load_digits
from jaxdiff.experiment import load_run, resolve_sampler, sample_and_evaluate
from jaxdiff.metrics import evaluate_samples, get_evaluator
from jaxdiff.metrics.classifier import accuracy, load_classifier
from jaxdiff.parallel import make_mesh

SETTINGS = (
    ("heun", 18, "cfg:2.0"),
    ("heun", 18, "none"),
    ("euler", 35, "cfg:2.0"),
    ("dpmpp_2m", 10, "cfg:2.0"),
    ("dpmpp_2m", 18, "cfg:2.0"),
)
# --smoke: a guided and an unguided setting at 2 steps. Each setting costs a compile of
# several seconds on a CPU and runs the same loop body; the test suite resolves every entry
# of SETTINGS separately, so a renamed solver or guidance still fails it.
SMOKE_SETTINGS = (("heun", 2, "cfg:2.0"), ("heun", 2, "none"))
HELD_OUT = 297
COLUMNS = ("fd_digits", "fd_at_297", "precision", "recall", "density", "coverage", "class_accuracy")


def _row(name, nfe, n, metrics, seconds):
    vals = " | ".join(f"{metrics[c]:.3f}" if c in metrics else "-" for c in COLUMNS)
    return f"| {name} | {nfe} | {n} | {vals} | {seconds:.0f} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/r3")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--jsonl", default=None, help="also append JSON lines here")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (2 steps, 24 samples; a tiny run unless --workdir is given): "
        "checks the benchmark runs, measures nothing",
    )
    args = parser.parse_args(argv)
    if args.smoke:  # smoke defaults; flags given explicitly still win
        parser.set_defaults(workdir=None, num=24, batch_size=24)
        args = parser.parse_args(argv)
    with smoke_workdir(args.workdir) as workdir:
        _evaluate(workdir, args, SMOKE_SETTINGS if args.smoke else SETTINGS)


def _evaluate(
    workdir: str, args: argparse.Namespace, settings: tuple[tuple[str, int, str], ...]
) -> None:
    clf = load_classifier()
    test_images, test_labels = load_digits("test")
    print(
        f"# {datetime.date.today()}  {platform.processor() or platform.machine()}  "
        f"jax {jax.__version__}  devices {jax.devices()}"
    )
    print(f"classifier held-out accuracy: {accuracy(clf, test_images, test_labels):.4f}")
    run = load_run(workdir, mesh=make_mesh())
    print(f"run {workdir}: step {run.step}, {run.num_classes} classes")
    evaluator = get_evaluator("fd_digits", classifier=clf)
    header = (
        "| setting | NFE | N | FD-digits | FD@297 | precision | recall | density | coverage "
        "| class acc. | s |"
    )
    lines = [header, "|" + "---|" * 11]
    records = []

    start = time.perf_counter()
    ref = evaluate_samples(evaluator, test_images, test_labels)
    ref["fd_at_297"] = ref["fd_digits"]
    lines.append(
        _row("real held-out digits (test split)", "-", HELD_OUT, ref, time.perf_counter() - start)
    )
    records.append({"setting": "test split", **ref})
    print(lines[-1], flush=True)

    for solver, steps, guidance in settings:
        start = time.perf_counter()
        res = sample_and_evaluate(
            run,
            evaluator,
            args.num,
            args.seed,
            spec=resolve_sampler(
                run.config.sample,
                num_classes=run.num_classes,
                solver=solver,
                steps=steps,
                guidance=guidance,
            ),
            batch_size=args.batch_size,
            return_samples=True,
        )
        small = evaluate_samples(evaluator, res.samples[:HELD_OUT], res.labels[:HELD_OUT])
        metrics = {**res.metrics, "fd_at_297": small["fd_digits"]}
        name = f"{solver} {steps} steps, guidance {guidance}"
        lines.append(_row(name, res.nfe, args.num, metrics, time.perf_counter() - start))
        records.append({"setting": name, "nfe": res.nfe, "num": args.num, **metrics})
        print(lines[-1], flush=True)

    print("\n".join(lines))
    append_jsonl(args.jsonl, records)


if __name__ == "__main__":
    main()
