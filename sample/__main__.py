"""Samples a trained run: ``python -m sample --workdir=W [--solver=... --steps=N --guidance=...]``.

Uses the run's stored sampler (``config.sample``: solver, steps, sigmas, guidance) unless a
flag overrides it, and prints the sampler it used. Writes a PNG grid and an .npz of the
samples (float32 in [-1, 1], with labels); with ``--eval=NAME`` it also prints metrics of
the samples (e.g. ``fd_digits``, ``fid``, ``toy``). Each sample is seeded by its index, so
the same seed gives the same images at any batch size or device count. ``--student=S
--switch_step=k`` samples the hybrid of diversity distillation: this run's first k steps,
then the distilled student S.
"""

import json
import os

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "Workdir of a training run.")
_SOLVER = flags.DEFINE_string(
    "solver", None, "euler, heun, edm_stochastic:s_churn=40, ddim:eta=1, ... (default: the run's)"
)
_STEPS = flags.DEFINE_integer("steps", None, "Solver steps (default: the run's config).")
_GUIDANCE = flags.DEFINE_string(
    "guidance", None, "NAME:key=value,... or none (default: the run's; see docs/guidance.md)."
)
_NUM = flags.DEFINE_integer("num", 64, "Number of samples.")
_LABELS = flags.DEFINE_string("labels", None, "Class labels: '3' or '0,1,7'; default cycles.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Samples per batch (over all devices).")
_EMA = flags.DEFINE_string("ema", "default", "EMA rate to use, or 'none' for raw params.")
_OUT = flags.DEFINE_string("out", None, "PNG path (default: WORKDIR/samples/grid.png).")
_SCALE = flags.DEFINE_integer("scale", None, "Grid upscaling (default: the run's config).")
_EVAL = flags.DEFINE_string("eval", None, "Evaluate the samples: fd_digits, fid or toy.")
_FID_STATS = flags.DEFINE_string("fid_stats", None, "Reference .npz (mu, sigma) for --eval=fid.")
_WEIGHTS = flags.DEFINE_string("inception_weights", None, "FID Inception weights file.")
_STUDENT = flags.DEFINE_string(
    "student", None, "Distilled student workdir: hybrid sampling, base first, student after."
)
_SWITCH = flags.DEFINE_integer("switch_step", 1, "Base-model steps before the student runs.")


def main(argv):
    """Runs the command; ``argv`` holds no positional arguments."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _NUM.value < 1 or _BATCH.value < 1:
        raise app.UsageError(
            f"--num and --batch_size must be >= 1, got {_NUM.value} and {_BATCH.value}"
        )
    from jaxdiff import experiment as ex
    from jaxdiff.parallel import make_mesh
    from jaxdiff.utils.images import save_image_grid
    from jaxdiff.utils.logs import quiet_library_logs
    from jaxdiff.utils.plots import render_points

    quiet_library_logs()
    mesh = make_mesh()
    run = ex.load_run(_WORKDIR.value, ema=None if _EMA.value == "none" else _EMA.value, mesh=mesh)
    spec = ex.resolve_sampler(
        run.config.sample,
        num_classes=run.num_classes,
        solver=_SOLVER.value,
        steps=_STEPS.value,
        guidance=_GUIDANCE.value,
    )
    print(f"sampler: {spec.describe()}")
    labels = ex.parse_labels(_LABELS.value, _NUM.value, run.num_classes)
    common = dict(num=_NUM.value, labels=labels, seed=_SEED.value, batch_size=_BATCH.value)
    metrics = None
    if _STUDENT.value:
        student = ex.load_run(_STUDENT.value, mesh=mesh)
        samples, nfe = ex.hybrid_generate_samples(
            run, student, spec, switch_step=_SWITCH.value, **common
        )
        if _EVAL.value:
            from jaxdiff.metrics import evaluate_samples

            metrics = evaluate_samples(_EVAL.value, samples, labels if run.num_classes else None)
    elif _EVAL.value:
        fid = {"reference_stats": _FID_STATS.value, "inception_weights": _WEIGHTS.value}
        options = {"fid": fid}
        result = ex.sample_and_evaluate(
            run, _EVAL.value, _NUM.value, _SEED.value, spec=spec,
            labels=labels if run.num_classes else None, batch_size=_BATCH.value,
            evaluator_options=options.get(_EVAL.value), return_samples=True,
        )  # fmt: skip
        samples, nfe, metrics = result.samples, result.nfe, result.metrics
    else:
        samples, nfe = ex.generate_samples(run, spec, **common)
    if metrics is not None:
        print(json.dumps({"eval": _EVAL.value, "num": _NUM.value, "nfe": nfe, **metrics}))
    out = _OUT.value or os.path.join(_WORKDIR.value, "samples", "grid.png")
    grid = render_points(samples)[None] if samples.ndim == 2 else samples[:400]
    save_image_grid(out, grid, scale=_SCALE.value or run.config.sample.grid_scale)
    np.savez(os.path.splitext(out)[0] + ".npz", samples=samples, labels=labels)
    print(f"wrote {len(samples)} samples ({nfe} network evaluations each) to {out}")


if __name__ == "__main__":
    app.run(main)
