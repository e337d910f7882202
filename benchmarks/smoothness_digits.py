"""FD-digits and latent-space smoothness of digits runs (Smooth Diffusion's claim).

Usage::

    python -m benchmarks.smoothness_digits --workdirs=runs/digits,RUN2
    python -m benchmarks.smoothness_digits --smoke  # seconds on a CPU; numbers mean nothing

For each run (its stored sampler, EMA params):

(a) FD-digits, class accuracy, precision and recall of ``--num`` class-conditional
    samples (:func:`jaxdiff.experiment.sample_and_evaluate`).
(b) Interpolation smoothness, as Smooth Diffusion's ISTD: for ``--pairs`` pairs of start
    noises ``z0, z1`` (the same for every run; pair ``p`` keeps the label ``p mod 10``)
    the ``--points`` images ``x_k`` sampled from ``slerp(z0, z1, k / (K - 1))`` with the
    run's deterministic sampler, and the steps ``delta_k = mean |x_{k+1} - x_k|`` (pixels
    in [-1, 1]). Reported: ``istd`` = mean over pairs of ``std_k delta_k`` (the paper's
    interpolation standard deviation, with pixel distance in place of LPIPS, which has no
    meaning on 8x8 digits), ``istd_rel`` = mean of ``std_k delta_k / mean_k delta_k``
    (scale-free: 0 for uniform steps, whatever the path's length), ``path`` = mean over
    pairs of ``sum_k delta_k``, and ``istd_feat`` = ``istd`` in the shipped digits
    classifier's feature space (Euclidean distance between features: a perceptual
    distance for digits).

Lower ``istd``/``istd_rel`` = smoother interpolation. Prints a Markdown table (and JSON
lines with ``--jsonl``).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import append_jsonl, smoke_workdir
from jaxdiff.experiment import load_run, resolve_sampler, sample_and_evaluate
from jaxdiff.generate import class_conditions, model_denoiser
from jaxdiff.metrics import get_evaluator
from jaxdiff.metrics.classifier import load_classifier
from jaxdiff.parallel import make_mesh
from jaxdiff.samplers import sample

COLUMNS = ("fd_digits", "class_accuracy", "precision", "recall")
SMOOTH = ("istd", "istd_rel", "path", "istd_feat")


def slerp(z0: np.ndarray, z1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation of ``[P, ...]`` noise pairs at ``[K]`` times: ``[P, K, ...]``."""
    a, b = z0.reshape(len(z0), -1), z1.reshape(len(z1), -1)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    theta = np.arccos(np.clip(cos, -1.0, 1.0))[:, None]
    t = np.asarray(t, np.float64)[None, :]
    w0 = np.sin((1 - t) * theta) / np.sin(theta)
    w1 = np.sin(t * theta) / np.sin(theta)
    out = w0[..., None] * a[:, None] + w1[..., None] * b[:, None]
    return out.reshape(len(z0), t.shape[1], *z0.shape[1:])


def step_stats(paths: np.ndarray) -> dict[str, float]:
    """ISTD statistics of ``[P, K, ...]`` paths (see the module docstring)."""
    steps = paths[:, 1:] - paths[:, :-1]
    delta = np.mean(np.abs(steps.reshape(*steps.shape[:2], -1)), axis=2)  # [P, K-1]
    std, mean = delta.std(axis=1), delta.mean(axis=1)
    return {
        "istd": float(std.mean()),
        "istd_rel": float(np.mean(std / np.maximum(mean, 1e-12))),
        "path": float(delta.sum(axis=1).mean()),
    }


def interpolation_smoothness(run, clf, *, pairs: int, points: int, seed: int) -> dict:
    """Samples the slerp paths of ``run`` and returns their :func:`step_stats`."""
    rng = np.random.default_rng(seed)
    shape = (pairs, *run.sample_shape)
    z = slerp(rng.standard_normal(shape), rng.standard_normal(shape), np.linspace(0, 1, points))
    noise = jnp.asarray(z.reshape(pairs * points, *run.sample_shape), jnp.float32)
    labels = np.repeat(np.arange(pairs) % max(run.num_classes, 1), points)
    spec = resolve_sampler(run.config.sample, num_classes=run.num_classes)

    @jax.jit
    def draw(params, noise, labels):
        cond, uncond = class_conditions(labels, run.num_classes)
        den = model_denoiser(run.model, run.formulation, params, **spec.model_kwargs)
        x, _ = sample(
            den,
            noise,
            jnp.asarray(spec.sigmas, jnp.float32),
            solver=spec.solver,
            guidance=spec.guidance,
            cond=cond,
            uncond=uncond,
            key=jax.random.key(seed),
        )
        return jnp.clip(x, -1.0, 1.0), clf.features(jnp.clip(x, -1.0, 1.0))

    images, feats = jax.device_get(
        draw(run.params, noise, jnp.asarray(labels, jnp.int32) if run.num_classes else None)
    )
    images = np.asarray(images, np.float64).reshape(pairs, points, -1)
    feats = np.asarray(feats, np.float64).reshape(pairs, points, -1)
    stats = step_stats(images)
    fsteps = np.linalg.norm(feats[:, 1:] - feats[:, :-1], axis=2)
    stats["istd_feat"] = float(fsteps.std(axis=1).mean())
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdirs", default="", help="comma-separated run folders")
    parser.add_argument("--num", type=int, default=1000, help="samples for FD-digits")
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--points", type=int, default=17)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--jsonl", default=None, help="also append JSON lines here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a tiny run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num, args.pairs, args.points, args.batch_size = 24, 2, 4, 24
    clf = load_classifier()
    evaluator = get_evaluator("fd_digits", classifier=clf)
    header = "| run | step | " + " | ".join(COLUMNS + SMOOTH) + " | s |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + len(SMOOTH) + 3)]
    workdirs = [w for w in args.workdirs.split(",") if w] or [None]
    for wd in workdirs:
        with smoke_workdir(wd) as workdir:
            start = time.perf_counter()
            run = load_run(workdir, mesh=make_mesh())
            res = sample_and_evaluate(
                run, evaluator, args.num, args.seed, batch_size=args.batch_size
            )
            smooth = interpolation_smoothness(
                run, clf, pairs=args.pairs, points=args.points, seed=args.seed
            )
            row = {"workdir": str(wd), "step": run.step, **res.metrics, **smooth}
            vals = " | ".join(f"{row[c]:.4f}" if c in row else "-" for c in COLUMNS + SMOOTH)
            lines.append(f"| {wd} | {run.step} | {vals} | {time.perf_counter() - start:.0f} |")
            print(lines[-1], flush=True)
            append_jsonl(args.jsonl, [row])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
