"""How far a MeanFlow student's jumps are from its teacher's ODE, by jump length.

Usage::

    python -m benchmarks.meanflow_jumps --student=runs/meanflow --teacher=runs/teacher
    python -m benchmarks.meanflow_jumps --smoke  # seconds on a CPU; the numbers mean nothing

A MeanFlow student jumps from ``z_t`` to ``z_r`` in one evaluation. Its sampler starts
every trajectory at the top level ``sigma_0`` (80 for the digits teacher), so its one-,
two- and four-step samples open with jumps from ``sigma_0`` down to 0, 17.5 or 2.5. This
benchmark measures each such jump against the teacher's probability-flow ODE solved
finely over the same interval (Heun on ``--ode_steps`` Karras levels), from the same
noise and labels, and reports the RMSE per pixel in EDM space (``x = z / (1 - t)``). The
teacher's single Euler step over the interval, which is where a student built from the
teacher's weights starts (its ``aux_time`` embedding is zero), is the reference row: a
jump the student has learned lies well below it, one it has not stays near it.

``--smoke`` trains a 2-step MeanFlow student of ``--teacher`` (or of a 5-step tiny
teacher it trains first) and measures 8 samples with a 4-level ODE.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

from benchmarks.common import Table, header_line, report, smoke_workdir
from jaxdiff.diffusion.schedules import karras_sigmas
from jaxdiff.distill.meanflow import MeanFlowConfig, denoiser_velocity, sample_meanflow
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment import load_run, run_experiment
from jaxdiff.generate import class_conditions
from jaxdiff.samplers import heun, sample
from jaxdiff.utils.rng import start_noise


def rmse(a: jax.Array, b: jax.Array) -> float:
    """Root mean square difference per pixel."""
    return float(jnp.sqrt(jnp.mean((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2)))


def jump_errors(student, teacher, targets: Sequence[float], num: int, ode_steps: int, seed: int):
    """``[(sigma_r, t - r, student RMSE, teacher Euler RMSE)]`` for jumps from ``sigma_0``."""
    s0 = float(student.config.sample.sigmas[0])
    t0 = s0 / (1.0 + s0)
    labels = jnp.arange(num) % max(teacher.num_classes, 1)
    cond, _ = class_conditions(labels if teacher.num_classes else None, teacher.num_classes)
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(seed), j))(jnp.arange(num))
    noise = start_noise(keys, teacher.sample_shape)

    def teacher_net(*args, **kwargs):
        return teacher.model.apply({"params": teacher.params}, *args, **kwargs)

    def student_net(params, *args, **kwargs):
        return student.model.apply({"params": params}, *args, **kwargs)

    denoise = teacher.formulation.as_denoiser(teacher_net)
    u = denoiser_velocity(student_net, student.formulation)
    sigma_min = float(teacher.config.sample.sigma_min)
    rho = float(teacher.config.sample.rho)
    rows = []
    for s_r in targets:
        if not 0.0 <= s_r < s0:
            raise InvalidArgumentError(f"target sigma {s_r} must lie in [0, sigma_0 = {s0:g})")
        r = s_r / (1.0 + s_r)
        if s_r == 0.0:
            levels = karras_sigmas(ode_steps, sigma_min, s0, rho)
        else:
            levels = karras_sigmas(ode_steps, s_r, s0, rho, append_zero=False)
        ode, _ = sample(denoise, noise, jnp.asarray(levels), solver=heun(), cond=cond)
        x = s0 * noise
        d = denoise(x, jnp.full((num,), s0), cond)
        euler = d + (s_r / s0) * (x - d)
        z_r = sample_meanflow(
            u, student.params, t0 * noise, cond, cfg=MeanFlowConfig(), times=(t0, r)
        )
        jumped = z_r / (1.0 - r)
        rows.append((s_r, t0 - r, rmse(jumped, ode), rmse(euler, ode)))
    return rows


@contextlib.contextmanager
def smoke_runs(teacher_dir: str | None) -> Iterator[tuple[str, str]]:
    """A 2-step MeanFlow student of ``teacher_dir`` (None: a tiny teacher trained here)."""
    from train.configs import distill_digits

    with smoke_workdir(teacher_dir) as teacher, tempfile.TemporaryDirectory() as tmp:
        c = distill_digits.get_config()
        c.method, c.teacher = "meanflow", teacher
        c.train.num_steps, c.train.batch_size, c.sample.grid_size = 2, 8, 0
        student = os.path.join(tmp, "meanflow")
        run_experiment(c, student)
        yield student, teacher


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default=None, help="a MeanFlow student's workdir")
    parser.add_argument("--teacher", default=None, help="its teacher's workdir")
    parser.add_argument("--targets", default="0,0.17,2.5,17.5", help="sigmas the jumps end at")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--ode_steps", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num, args.ode_steps, args.targets = 8, 4, "0,2.5"
    elif args.student is None or args.teacher is None:  # --smoke trains its own student
        raise InvalidArgumentError("--student and --teacher are required, or --smoke")
    targets = [float(s) for s in args.targets.split(",") if s]
    given = contextlib.nullcontext((args.student, args.teacher))
    runs = smoke_runs(args.teacher) if args.smoke else given
    with runs as (student_dir, teacher_dir):
        student, teacher = load_run(student_dir), load_run(teacher_dir)
        if student.config.sample.get("solver") != "meanflow":
            raise InvalidArgumentError(f"{student_dir} is not a MeanFlow student run")
        rows = jump_errors(student, teacher, targets, args.num, args.ode_steps, args.seed)
    s0 = float(student.config.sample.sigmas[0])
    table = Table(
        f"jumps from sigma {s0:g}: RMSE per pixel against the teacher's ODE "
        f"(Heun, {args.ode_steps} levels), {args.num} samples",
        ["to sigma", "flow gap t - r", "student jump", "teacher's one Euler step"],
    )
    for s_r, gap, err, euler in rows:
        table.add([s_r, gap, err, euler])
    header = header_line("MeanFlow jumps") + f" | student step {student.step}"
    return report(header, [table], args.json)


if __name__ == "__main__":
    main()
