"""Inversion and Direct Inversion editing of held-out digits with a trained run.

Usage::

    python -m benchmarks.edit_digits --workdir=runs/digits --num=100 \\
        --recon_steps= --scale=2 --strengths=1,0.7,0.5 --injects=0,1 --modes=source,both \\
        --grid=docs/editing_grid.png --jsonl=edit.jsonl

Part 1 (skipped with ``--recon_steps=``): reconstruction RMSE (pixels in [-1, 1]) of plain
inversion (conditional model on the true label, ``w = 1``) followed by regeneration on the
reversed grid, for Euler and Heun at several step counts, on the ``"test"`` split. Part 2:
every digit is edited to ``(label + 1) mod 10`` at ``--edit_steps`` Heun steps and CFG
scale ``--scale`` by Direct Inversion for every edit depth in ``--strengths``, attention
injection fraction in ``--injects`` and correction mode in ``--modes`` (mode ``both``
only with the fractions in ``--both_injects``). Mode ``source`` without injection is
naive editing from the same depth (invert on the source label, sample the target label
with CFG); the script checks that it is. Reported: the shipped digits
classifier's accuracy on the target class, pixel RMSE to the source, and the mean L2
distance of the classifier's features to the source's. A reference row replaces each
digit by a real test digit of the target class. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from jaxdiff.data import load_digits
from jaxdiff.experiment import build_precision, load_run
from jaxdiff.generate import model_denoiser
from jaxdiff.guidance import cfg
from jaxdiff.metrics.classifier import load_classifier
from jaxdiff.parallel import make_mesh
from jaxdiff.samplers import euler, heun, inversion_sigmas, invert, regenerate
from jaxdiff.samplers.inversion import direct_inversion_edit, edit_depth


def _rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _scores(clf, edited, sources, targets) -> dict[str, float]:
    logits = np.asarray(jax.jit(clf.logits)(edited))
    f_e = np.asarray(jax.jit(clf.features)(edited), np.float64)
    f_s = np.asarray(jax.jit(clf.features)(sources), np.float64)
    return {
        "target_acc": float(np.mean(logits.argmax(-1) == targets)),
        "pixel_rmse": _rmse(edited, sources),
        "feature_dist": float(np.mean(np.linalg.norm(f_e - f_s, axis=-1))),
    }


def _reconstruction(run, images, labels, steps: list[int], rows: list[dict]) -> None:
    sc = run.config.sample
    print("| solver | steps | NFE (invert + regenerate) | reconstruction RMSE | s |")
    print("|---|---|---|---|---|")
    for name, solver in (("euler", euler()), ("heun", heun())):
        for n in steps:
            grid = inversion_sigmas(n, sc.sigma_min, sc.sigma_max, sc.rho)

            @jax.jit
            def round_trip(p, x, c, grid=grid, solver=solver):
                den = model_denoiser(run.model, run.formulation, p)
                z, a = invert(den, x, grid, solver=solver, cond=c)
                back, b = regenerate(den, z, grid, solver=solver, cond=c)
                return back, a["nfe"] + b["nfe"]

            t0 = time.time()
            back, nfe = jax.block_until_ready(round_trip(run.params, images, labels))
            row = {"part": "recon", "solver": name, "steps": n, "nfe": int(nfe)}
            row |= {"rmse": _rmse(back, images), "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(f"| {name} | {n} | {row['nfe']} | {row['rmse']:.4f} | {row['seconds']} |")


def main() -> None:
    """Runs both parts and prints the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num", type=int, default=297)
    parser.add_argument("--recon_steps", default="8,18,32,64", help="empty: skip part 1")
    parser.add_argument("--edit_steps", type=int, default=18)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--strengths", default="1,0.7,0.5")
    parser.add_argument("--injects", default="0,1")
    parser.add_argument("--modes", default="source,both")
    parser.add_argument("--both_injects", default="0", help="injects run in mode both")
    parser.add_argument("--grid", default=None, help="PNG: sources, naive, --grid_pick")
    parser.add_argument("--grid_pick", default=None, help="strength,inject,mode to show")
    parser.add_argument("--jsonl", default=None)
    args = parser.parse_args()

    run = load_run(args.workdir, mesh=make_mesh())
    sc = run.config.sample
    images, labels = load_digits("test")
    images, labels = images[: args.num], labels[: args.num]
    targets = ((labels + 1) % 10).astype(np.int32)
    null = np.full_like(labels, run.num_classes)
    clf = load_classifier()
    rows: list[dict] = []
    grid = inversion_sigmas(args.edit_steps, sc.sigma_min, sc.sigma_max, sc.rho)

    def edit(strength, inject, mode):
        @jax.jit
        def fn(p, x, c, t):
            den = model_denoiser(run.model, run.formulation, p)
            out, aux = direct_inversion_edit(
                den, x, grid, solver=heun(), cond_src=c, cond_tgt=t, uncond=null[: len(x)],
                guidance=cfg(args.scale), mode=mode, strength=strength, inject=inject,
            )  # fmt: skip
            return out, aux["source"], aux["nfe"]

        return fn

    with build_precision(run.config).scope():
        if args.recon_steps.strip():
            _reconstruction(run, images, labels, [int(v) for v in _floats(args.recon_steps)], rows)
        picks = np.array([int(np.flatnonzero(labels == k)[0]) for k in range(10)])
        real = images[picks[targets]]  # the first test digit of each target class
        ref = {"part": "edit", "method": "real target digit"}
        rows.append(ref | _scores(clf, real, images, targets))
        rows.append({"part": "edit", "method": "source (no edit)"})
        rows[-1] |= _scores(clf, images, images, targets)
        shown = {"source": images[picks]}
        for strength in _floats(args.strengths):
            naive = None
            for inject in _floats(args.injects):
                for mode in args.modes.split(","):
                    if mode == "both" and inject not in _floats(args.both_injects):
                        continue
                    t0 = time.time()
                    fn = edit(strength, inject, mode)
                    out, source, nfe = jax.device_get(fn(run.params, images, labels, targets))
                    name = f"{strength:g},{inject:g},{mode}"
                    row = {"part": "edit", "method": name, "strength": strength}
                    row |= {"inject": inject, "mode": mode, "scale": args.scale}
                    row |= {"nfe": int(nfe), "source_branch_rmse": _rmse(source, images)}
                    row |= _scores(clf, out, images, targets)
                    row["seconds"] = round(time.time() - t0, 1)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    shown[name] = out[picks]
                    if inject == 0 and mode == "source":
                        naive = out
                        shown[f"naive {strength:g}"] = out[picks]
            if naive is not None and 0.0 in _floats(args.injects):
                # Paper form without injection == naive editing from the same depth.
                sub = grid[: edit_depth(args.edit_steps, strength) + 1]

                @jax.jit
                def naive_fn(p, x, c, t, sub=sub):
                    den = model_denoiser(run.model, run.formulation, p)
                    z, _ = invert(den, x, sub, solver=heun(), cond=c)
                    return regenerate(
                        den, z, sub, solver=heun(), guidance=cfg(args.scale), cond=t,
                        uncond=null[: len(x)],
                    )[0]  # fmt: skip

                ref_naive = np.asarray(naive_fn(run.params, images, labels, targets))
                err = _rmse(ref_naive, naive)
                print(f"strength {strength:g}: paper form (no injection) vs naive RMSE {err:.2e}")
                assert err < 1e-4, "paper-form target differs from naive editing"

    print("\n| strength | inject | mode | target-class acc | pixel RMSE | feature dist | NFE |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["part"] == "edit":
            cells = [r.get("strength", "-"), r.get("inject", "-"), r.get("mode", r["method"])]
            cells = ["-" if c == "-" else f"{c:g}" if isinstance(c, float) else c for c in cells]
            print(
                f"| {' | '.join(cells)} | {r['target_acc']:.3f} | {r['pixel_rmse']:.4f} | "
                f"{r['feature_dist']:.2f} | {r.get('nfe', '-')} |"
            )
    if args.grid:
        from jaxdiff.utils.images import save_image_grid

        first = _floats(args.strengths)[0]
        last = (_floats(args.strengths)[-1], _floats(args.injects)[-1])
        pick = args.grid_pick or f"{last[0]:g},{last[1]:g},source"
        chosen = [shown["source"], shown.get(f"naive {first:g}", shown["source"]), shown[pick]]
        save_image_grid(args.grid, np.concatenate(chosen), nrow=10, scale=3)
        print(f"grid: rows source, naive (strength {first:g}), {pick}")
    if args.jsonl:
        with open(args.jsonl, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        # The 10 shown digits of every setting, to redraw the grid with another pick.
        np.savez(args.jsonl.rsplit(".", 1)[0] + "_shown.npz", **shown)


if __name__ == "__main__":
    main()
