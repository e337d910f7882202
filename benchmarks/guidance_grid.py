"""One row of samples per guidance method, same seeds and labels: docs/guidance_grid.png.

Usage (a trained digits run, a weaker run of the same model for autoguidance, and a
noise-aware classifier for classifier/minority guidance)::

    python -m train --config=train/configs/digits_classifier.py --workdir=runs/clf \\
        --config.noise_aware=True --config.out=runs/noisy_classifier.npz
    python -m benchmarks.guidance_grid --workdir=runs/digits --guide=runs/digits_early \\
        --classifier=runs/noisy_classifier.npz --out=docs/guidance_grid.png

Each row is Heun with 18 steps (CFG++, which needs a solver that re-noises with its
unconditional estimate, uses Euler); column k is class k, seed j for column j.
"""

import argparse
import time

import numpy as np
from PIL import Image, ImageDraw

from jaxdiff.experiment import generate_samples, load_run, resolve_sampler
from jaxdiff.utils.images import make_grid, upscale


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--guide", default=None, help="weaker run for autoguidance")
    parser.add_argument("--classifier", default=None, help="noise-aware classifier .npz")
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/guidance_grid.png")
    args = parser.parse_args()
    run = load_run(args.workdir)
    labels = np.arange(run.num_classes, dtype=np.int32)
    rows, names = [], []
    for spec in specs(args.guide, args.classifier):
        start = time.perf_counter()
        sampler = resolve_sampler(
            run.config.sample,
            num_classes=run.num_classes,
            solver="euler" if spec.startswith("cfgpp") else "heun",
            steps=args.steps,
            guidance=spec,
        )
        x, nfe = generate_samples(run, sampler, num=len(labels), labels=labels, seed=args.seed)
        rows.append(x)
        name = spec.split(",guide=")[0].split(",classifier=")[0]
        names.append(f"{name} ({nfe} NFE)")
        print(f"{name:40s} nfe={nfe:4d}  {time.perf_counter() - start:5.1f} s")
    grid = upscale(make_grid(np.concatenate(rows), nrow=len(labels)), 4)
    label_w = 260
    canvas = Image.new("RGB", (grid.shape[1] + label_w, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    cell = grid.shape[0] / len(rows)
    for i, name in enumerate(names):
        draw.text((6, int(i * cell + cell / 2) - 6), name, fill="black")
    canvas.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
