"""One row of samples per guidance method, same seeds and labels: docs/guidance_grid.png.

Usage (a trained digits run, a weaker run of the same model for autoguidance, and a
noise-aware classifier for classifier/minority guidance)::

    python -m train --config=train/configs/digits_classifier.py --workdir=runs/clf \\
        --config.noise_aware=True --config.out=runs/noisy_classifier.npz
    python -m benchmarks.guidance_grid --workdir=runs/digits --guide=runs/digits_early \\
        --classifier=runs/noisy_classifier.npz --out=docs/guidance_grid.png
    python -m benchmarks.guidance_grid --smoke [--workdir=runs/digits] [--out=/tmp/grid.png]

Each row is Heun with 18 steps (CFG++, which needs a solver that re-noises with its
unconditional estimate, uses Euler); column k is class k, seed j for column j.

``--smoke`` checks at tiny size that the benchmark still works (the picture means
nothing): 2 steps; ``--workdir`` defaults to a 5-step tiny digits run trained into a
temporary folder, ``--guide`` to the run itself, ``--classifier`` to a randomly initialised
noise-aware classifier, ``--out`` to a new temporary folder. Every row's spec is parsed,
but only the rows in ``SMOKE_ROWS`` are sampled (each compiles for seconds on a CPU).
"""

import argparse
import contextlib
import os
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import save_labelled_rows, smoke_workdir
from jaxdiff.experiment import generate_samples, load_run, resolve_sampler
from jaxdiff.metrics.classifier import DigitsClassifier, classifier_model, save_classifier

# The rows --smoke samples, by method: the grid's own branches (the Euler row of CFG++, and
# the Heun rows that load a second run and a classifier file).
SMOKE_ROWS = ("cfgpp", "autoguidance", "classifier")


def specs(guide: str | None, classifier: str | None) -> list[str]:
    rows = [
        "none",
        "cfg:2.0",
        "interval:2.0",
        "rescale:2.0,phi=0.7",
        "apg:2.0",
        "ag:2.0",
        "cfgpp:0.6",
        "cfg_zero_star:2.0",
        "pag:pag_scale=2.0",
        "slg:slg_scale=2.0,start=0.0,stop=1.0",
        "elucd:0.05",  # its x0-gradient weight grows like sigma: small scales only
        "gfcg:2.0",
    ]
    if guide:
        rows.append(f"autoguidance:2.0,guide={guide}")
    if classifier:
        rows.append(f"classifier:2.0,classifier={classifier}")
    return rows


def random_classifier(path: str) -> str:
    """Writes a randomly initialised noise-aware digits classifier to ``path`` (--smoke)."""
    model = classifier_model(noise_aware=True, dropout=0.0)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
    params = jax.tree.map(np.asarray, nn.unbox(variables["params"]))
    save_classifier(path, DigitsClassifier(model, params, meta={"init": "random (--smoke)"}))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=None, help="digits run (required unless --smoke)")
    parser.add_argument("--guide", default=None, help="weaker run for autoguidance")
    parser.add_argument("--classifier", default=None, help="noise-aware classifier .npz")
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/guidance_grid.png")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks the benchmark runs (see above)"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # smoke defaults; flags given explicitly still win
        parser.set_defaults(steps=2, out=None)
        args = parser.parse_args(argv)
    elif args.workdir is None:
        parser.error("--workdir is required (a trained digits run), unless --smoke is given")
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(smoke_workdir(args.workdir))
        guide, classifier, out = args.guide, args.classifier, args.out
        if args.smoke:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="jaxdiff-smoke-clf-"))
            guide = guide or workdir
            classifier = classifier or random_classifier(os.path.join(tmp, "classifier.npz"))
            # Kept after the run, so the grid can be looked at.
            out = out or os.path.join(tempfile.mkdtemp(prefix="jaxdiff-smoke-grid-"), "grid.png")
        draw_grid(workdir, specs(guide, classifier), args.steps, args.seed, out, args.smoke)


def draw_grid(
    workdir: str, rows_specs: list[str], steps: int, seed: int, out: str, smoke: bool
) -> None:
    """Samples one row per spec (only ``SMOKE_ROWS`` if ``smoke``) and saves the grid."""
    run = load_run(workdir)
    labels = np.arange(run.num_classes, dtype=np.int32)
    rows, names = [], []
    for spec in rows_specs:
        start = time.perf_counter()
        sampler = resolve_sampler(
            run.config.sample,
            num_classes=run.num_classes,
            solver="euler" if spec.startswith("cfgpp") else "heun",
            steps=steps,
            guidance=spec,
        )
        name = spec.split(",guide=")[0].split(",classifier=")[0]
        if smoke and spec.split(":")[0] not in SMOKE_ROWS:
            print(f"{name:40s} parsed, not sampled (--smoke)")
            continue
        x, nfe = generate_samples(run, sampler, num=len(labels), labels=labels, seed=seed)
        rows.append(x)
        names.append(f"{name} ({nfe} NFE)")
        print(f"{name:40s} nfe={nfe:4d}  {time.perf_counter() - start:5.1f} s")
    save_labelled_rows(rows, names, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
