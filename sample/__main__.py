"""Samples a trained run: ``python -m sample --workdir=W [--solver=heun --steps=18 ...]``.

Writes a PNG grid and an .npz of the samples (float32 in [-1, 1], with labels). Each
sample is seeded by its index, so the same seed gives the same images at any batch size.
"""

import os

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "Workdir of a training run.")
_SOLVER = flags.DEFINE_string("solver", "heun", "euler, heun, edm_stochastic, ddim, ...")
_STEPS = flags.DEFINE_integer("steps", None, "Solver steps (default: the run's config).")
_GUIDANCE = flags.DEFINE_string("guidance", None, "e.g. cfg:2.0 or none (default: config).")
_NUM = flags.DEFINE_integer("num", 64, "Number of samples.")
_LABELS = flags.DEFINE_string("labels", None, "Class labels: '3' or '0,1,7'; default cycles.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Samples per device batch.")
_EMA = flags.DEFINE_string("ema", "default", "EMA rate to use, or 'none' for raw params.")
_OUT = flags.DEFINE_string("out", None, "PNG path (default: WORKDIR/samples/grid.png).")
_SCALE = flags.DEFINE_integer("scale", None, "Grid upscaling (default: the run's config).")


def main(argv):
    """Runs the command; ``argv`` holds no positional arguments."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxdiff.diffusion import karras_sigmas
    from jaxdiff.guidance import parse_guidance
    from jaxdiff.inference import generate_samples, load_run, parse_labels
    from jaxdiff.samplers import get_solver
    from jaxdiff.utils.images import save_image_grid
    from jaxdiff.utils.plots import render_points

    run = load_run(_WORKDIR.value, ema=None if _EMA.value == "none" else _EMA.value)
    sc = run.config.sample
    steps = _STEPS.value or sc.steps
    guidance = parse_guidance(_GUIDANCE.value if _GUIDANCE.value is not None else sc.guidance)
    if run.num_classes == 0:
        guidance = None
    labels = parse_labels(_LABELS.value, _NUM.value, run.num_classes)
    sigmas = karras_sigmas(steps, sc.sigma_min, sc.sigma_max, sc.rho)
    samples, nfe = generate_samples(
        run,
        num=_NUM.value,
        solver=get_solver(_SOLVER.value),
        sigmas=sigmas,
        guidance=guidance,
        labels=labels,
        seed=_SEED.value,
        batch_size=_BATCH.value,
    )
    out = _OUT.value or os.path.join(_WORKDIR.value, "samples", "grid.png")
    grid = render_points(samples)[None] if samples.ndim == 2 else samples
    save_image_grid(out, grid, scale=_SCALE.value or sc.grid_scale)
    np.savez(os.path.splitext(out)[0] + ".npz", samples=samples, labels=labels)
    print(f"wrote {len(samples)} samples ({nfe} network evaluations each) to {out}")


if __name__ == "__main__":
    app.run(main)
