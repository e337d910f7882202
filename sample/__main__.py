"""Samples a trained run: ``python -m sample --workdir=W [--solver=heun --steps=18 ...]``.

Writes a PNG grid and an .npz of the samples (float32 in [-1, 1], with labels); with
``--eval=NAME`` it also prints metrics of the samples (e.g. ``fd_digits``, ``fid``, ``toy``).
Each sample is seeded by its index, so the same seed gives the same images at any batch
size or device count. ``--student=S --switch_step=k`` samples the hybrid of diversity
distillation: this run's first k steps, then the distilled student S.
"""

import json
import os

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "Workdir of a training run.")
_SOLVER = flags.DEFINE_string("solver", "heun", "euler, heun, edm_stochastic, ddim, ...")
_STEPS = flags.DEFINE_integer("steps", None, "Solver steps (default: the run's config).")
_GUIDANCE = flags.DEFINE_string("guidance", None, "NAME:key=value,... or none (see docs).")
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
    from jaxdiff.diffusion import karras_sigmas
    from jaxdiff.inference import build_guidance, generate_samples, load_run, parse_labels
    from jaxdiff.samplers import get_solver
    from jaxdiff.utils.images import save_image_grid
    from jaxdiff.utils.logs import quiet_library_logs
    from jaxdiff.utils.plots import render_points

    quiet_library_logs()
    run = load_run(_WORKDIR.value, ema=None if _EMA.value == "none" else _EMA.value)
    sc = run.config.sample
    spec = _GUIDANCE.value if _GUIDANCE.value is not None else sc.guidance
    guidance = build_guidance(spec) if run.num_classes else None
    labels = parse_labels(_LABELS.value, _NUM.value, run.num_classes)
    kw = dict(
        solver=get_solver(_SOLVER.value),
        sigmas=karras_sigmas(_STEPS.value or sc.steps, sc.sigma_min, sc.sigma_max, sc.rho),
        guidance=guidance,
        labels=labels,
        seed=_SEED.value,
        batch_size=_BATCH.value,
    )
    if _STUDENT.value:
        from jaxdiff.distill.hybrid import hybrid_generate_samples

        samples, nfe = hybrid_generate_samples(
            run, load_run(_STUDENT.value), num=_NUM.value, switch_step=_SWITCH.value, **kw
        )
        if _EVAL.value:
            from jaxdiff.metrics.evaluate import evaluate_samples

            metrics = evaluate_samples(_EVAL.value, samples, labels)
            print(json.dumps({"eval": _EVAL.value, "num": _NUM.value, "nfe": nfe, **metrics}))
    elif _EVAL.value:
        from jaxdiff.metrics import sample_and_evaluate
        from jaxdiff.parallel import make_mesh

        options = {
            "fid": {"reference_stats": _FID_STATS.value, "inception_weights": _WEIGHTS.value}
        }
        result = sample_and_evaluate(
            run, _EVAL.value, _NUM.value, mesh=make_mesh(), return_samples=True,
            evaluator_kwargs=options.get(_EVAL.value), **kw,
        )  # fmt: skip
        samples, nfe = result.samples, result.nfe
        print(json.dumps({"eval": _EVAL.value, "num": _NUM.value, "nfe": nfe, **result.metrics}))
    else:
        samples, nfe = generate_samples(run, num=_NUM.value, **kw)
    out = _OUT.value or os.path.join(_WORKDIR.value, "samples", "grid.png")
    grid = render_points(samples)[None] if samples.ndim == 2 else samples[:400]
    save_image_grid(out, grid, scale=_SCALE.value or sc.grid_scale)
    np.savez(os.path.splitext(out)[0] + ".npz", samples=samples, labels=labels)
    print(f"wrote {len(samples)} samples ({nfe} network evaluations each) to {out}")


if __name__ == "__main__":
    app.run(main)
