"""Steady training rate of every distillation method, and the step budget it gives.

Usage::

    python -m benchmarks.distill_rates --teacher=runs/teacher [--methods=cd,ct] [--minutes=6]
    python -m benchmarks.distill_rates --smoke  # seconds on a CPU; the numbers mean nothing

The comparison in docs/distillation.md gives every method the same CPU time, not the same
number of steps: a consistency-distillation step runs a Heun teacher step, a
consistency-training step none. Each method's default ``num_steps`` in
``train/configs/distill_digits.py`` is its measured rate times the budget, so this is the
script that sizes them (run it on an otherwise idle machine: the rates are what a
method gets with every core).

For each method it runs ``python -m train``'s own function (:func:`run_experiment`) for
``--steps`` steps on the distillation config with the given teacher, logging every
``--log_every`` steps, and reads ``steps_per_s`` from the run's ``metrics.jsonl``. The
first log window holds the compilation and is dropped; the rate is the mean of the
others. The table gives the rate, the steps that fill ``--minutes``, and the config's
default with the minutes it takes at that rate.

``--smoke`` trains a 5-step tiny teacher (unless ``--teacher`` is given) and times
consistency training for 4 steps at batch 8.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence

from benchmarks.common import Table, header_line, report, smoke_workdir
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment import run_experiment
from jaxdiff.experiment.distill import DISTILL_METHODS

METHODS = ("fdistill", "fdistill4", *(m for m in DISTILL_METHODS if m != "fdistill"))
"""Timed methods: ``config.method`` names, plus ``fdistill4`` (the 4-step f-distill
student, whose backward simulation makes its steps dearer than the 1-step default's)."""


def method_config(name: str, teacher: str, steps: int, log_every: int, batch: int | None):
    """The distillation config that times ``name`` for ``steps`` steps."""
    from train.configs import distill_digits

    if name not in METHODS:
        raise InvalidArgumentError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    c = distill_digits.get_config()
    c.teacher = teacher
    c.method = "fdistill" if name == "fdistill4" else name
    if name == "fdistill4":
        c.distill.student_steps = 4
    c.train.num_steps = steps
    c.train.log_every = log_every
    c.train.checkpoint_every = steps
    c.sample.grid_size = 0
    if batch is not None:
        c.train.batch_size = batch
    return c


def default_steps(name: str) -> int | None:
    """The config's default budget of ``name`` (None for ``fdistill4``: not a default)."""
    from train.configs import distill_digits

    if name == "fdistill4":
        return None
    c = distill_digits.get_config()
    return int(c["distill" if name == "fdistill" else name].num_steps)


def steady_rate(metrics_path: str) -> float:
    """Mean ``steps_per_s`` of a run's log windows after the first (which compiles)."""
    with open(metrics_path) as f:
        rates = [json.loads(line)["steps_per_s"] for line in f if "steps_per_s" in line]
    if len(rates) < 2:
        raise InvalidArgumentError(
            f"{metrics_path} logged {len(rates)} rate(s); need --steps >= 2 * --log_every"
        )
    return sum(rates[1:]) / len(rates[1:])


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="the teacher's workdir")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=6.0, help="the budget to size")
    parser.add_argument("--batch", type=int, default=None, help="default: the config's 64")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if args.smoke:
        methods, args.steps, args.log_every, args.batch = ["ct"], 4, 2, 8
    elif args.teacher is None:
        raise InvalidArgumentError("--teacher is required (a digits run's workdir), or --smoke")
    table = Table(
        f"steady training rate, budget {args.minutes:g} min",
        ["method", "steps/s", f"steps in {args.minutes:g} min", "default steps", "default min"],
    )
    with smoke_workdir(args.teacher) as teacher, tempfile.TemporaryDirectory() as tmp:
        for name in methods:
            config = method_config(name, teacher, args.steps, args.log_every, args.batch)
            workdir = os.path.join(tmp, name)
            run_experiment(config, workdir)
            rate = steady_rate(os.path.join(workdir, "metrics.jsonl"))
            default = default_steps(name)
            budget = int(rate * 60 * args.minutes)
            minutes = None if default is None else default / rate / 60
            table.add([name, rate, budget, default, minutes])
    header = header_line("Distillation training rates") + f" | {os.cpu_count()} CPUs"
    return report(header, [table], args.json)


if __name__ == "__main__":
    main()
