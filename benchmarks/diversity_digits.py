"""Diversity vs class accuracy of diversity guidance (NegToMe, c-VSG) on a digits run.

Usage::

    python -m benchmarks.diversity_digits --workdir=runs/digits \\
        --methods="cfg:2;cvsg:0.05,cfg_scale=2,include_batch=false;cvsg:0.05,cfg_scale=2"
    python -m benchmarks.diversity_digits --workdir=DIT_RUN --methods="cfg:2;negtome:0.9,scale=2"
    python -m benchmarks.diversity_digits --smoke  # seconds on a CPU; numbers mean nothing

Every method draws the same samples: ``--batches`` batches of ``--per_class`` images of
each class, one class per batch (as NegToMe's reference merges images of one prompt),
with start noise from ``fold_in(key(seed), batch * 10 + class)``, using the run's stored
solver and steps and EMA params. Methods are guidance specs (``;``-separated, see
:func:`jaxdiff.guidance.parse_guidance`); ``vendi``/``cvsg`` get the shipped digits
classifier's penultimate features as ``features_fn``, ``--exemplars`` real training
digits of each class as exemplars (0 = none), and, with ``include_batch=false``, a
memory bank fed batch to batch: after each batch its final samples' features join the
bank of their class (``bank_add``), which the next batch of that class is pushed away from.

Reported per method: FD-digits, class accuracy, precision and recall against the
held-out digits (:func:`jaxdiff.metrics.fd_digits.fd_digits_metrics`), and two
diversity measures within each class, averaged over classes: ``pair_dist``, the mean
pairwise Euclidean distance between classifier features, and ``vendi``, the Vendi score
of the class's samples (cosine kernel on the same features). Prints a Markdown table
(and JSON lines with ``--jsonl``).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import append_jsonl, smoke_workdir
from jaxdiff.data.digits import load_digits
from jaxdiff.experiment import load_run, resolve_sampler
from jaxdiff.generate import class_conditions, model_denoiser
from jaxdiff.guidance import (
    VendiBank,
    VendiGuidance,
    bank_add,
    bank_from_features,
    parse_guidance,
)
from jaxdiff.metrics.classifier import load_classifier
from jaxdiff.metrics.fd_digits import classifier_outputs, fd_digits_metrics
from jaxdiff.samplers import per_sample_normal, sample

COLUMNS = ("fd_digits", "class_accuracy", "precision", "recall", "pair_dist", "vendi")
NUM_CLASSES = 10


def within_class_diversity(feats: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean over classes of the pairwise feature distance and the Vendi score."""
    dists, scores = [], []
    for c in np.unique(labels):
        f = np.asarray(feats[labels == c], np.float64)
        if len(f) < 2:
            continue
        d = np.sqrt(np.maximum(((f[:, None] - f[None]) ** 2).sum(-1), 0.0))
        dists.append(d.sum() / (len(f) * (len(f) - 1)))
        u = f / np.linalg.norm(f, axis=1, keepdims=True)
        lam = np.linalg.eigvalsh(u.T @ u / len(u))
        lam = lam[lam > 1e-12]
        scores.append(float(np.exp(-np.sum(lam * np.log(lam)))))
    return {"pair_dist": float(np.mean(dists)), "vendi": float(np.mean(scores))}


def exemplar_bank(clf, per_class: int):
    """A bank of the first ``per_class`` training digits of each class (None for 0)."""
    if per_class <= 0:
        return None
    x, y = load_digits("train")
    idx = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(NUM_CLASSES)])
    return bank_from_features(clf.features(jnp.asarray(x[idx])), y[idx], NUM_CLASSES)


def run_method(run, spec, guidance, clf, args) -> tuple[np.ndarray, np.ndarray, float]:
    """Samples every batch of one method; returns ``(images, labels, seconds)``."""

    @jax.jit
    def draw(params, noise, labels, guidance):
        cond, uncond = class_conditions(labels, run.num_classes)
        den = model_denoiser(run.model, run.formulation, params, **spec.model_kwargs)
        x, _ = sample(
            den,
            noise,
            jnp.asarray(spec.sigmas, jnp.float32),
            solver=spec.solver,
            guidance=guidance,
            cond=cond,
            uncond=uncond,
            key=jax.random.key(args.seed),
        )
        x = jnp.clip(x, -1.0, 1.0)
        return x, clf.features(x)

    feed = isinstance(guidance, VendiGuidance) and not guidance.include_batch
    if feed and guidance.bank is None:  # an empty bank of each class, filled as we go
        dim = clf.features(jnp.zeros((1, *run.sample_shape))).shape[-1]
        empty = VendiBank(jnp.zeros((NUM_CLASSES, dim, dim)), jnp.zeros((NUM_CLASSES,)))
        guidance = guidance.replace(bank=empty)
    images, labels = [], []
    start = time.perf_counter()
    for j in range(args.batches):
        for c in range(NUM_CLASSES):
            key = jax.random.fold_in(jax.random.key(args.seed), j * NUM_CLASSES + c)
            noise = per_sample_normal(key, (args.per_class, *run.sample_shape))
            lab = jnp.full((args.per_class,), c, jnp.int32)
            x, f = jax.device_get(draw(run.params, noise, lab, guidance))
            if feed:
                guidance = guidance.replace(bank=bank_add(guidance.bank, jnp.asarray(f), lab))
            images.append(np.asarray(x))
            labels.append(np.full(args.per_class, c))
    return np.concatenate(images), np.concatenate(labels), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="a class-conditional digits run")
    parser.add_argument("--methods", default="cfg:2", help="';'-separated guidance specs")
    parser.add_argument("--per_class", type=int, default=20, help="images per batch")
    parser.add_argument("--batches", type=int, default=5, help="batches of each class")
    parser.add_argument("--exemplars", type=int, default=4, help="real exemplars per class")
    parser.add_argument("--steps", type=int, default=None, help="override the run's steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jsonl", default=None, help="also append JSON lines here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a tiny run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.per_class, args.batches, args.steps = 3, 1, 2
    clf = load_classifier()
    exemplars = exemplar_bank(clf, args.exemplars)
    header = "| method | " + " | ".join(COLUMNS) + " | s |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    with smoke_workdir(args.workdir) as workdir:
        run = load_run(workdir)
        spec = resolve_sampler(run.config.sample, num_classes=run.num_classes, steps=args.steps)
        for method in filter(None, (m.strip() for m in args.methods.split(";"))):
            guidance = parse_guidance(method, features_fn=clf.features)
            if isinstance(guidance, VendiGuidance) and exemplars is not None:
                guidance = guidance.replace(exemplars=exemplars)
            images, labels, secs = run_method(run, spec, guidance, clf, args)
            feats, logits = classifier_outputs(images, clf)
            row = {
                "method": method,
                "workdir": str(args.workdir),
                "step": run.step,
                "num": len(images),
                **fd_digits_metrics(feats, logits, labels, classifier=clf),
                **within_class_diversity(feats, labels),
            }
            vals = " | ".join(f"{row[c]:.4f}" for c in COLUMNS)
            lines.append(f"| `{method}` | {vals} | {secs:.0f} |")
            print(lines[-1], flush=True)
            append_jsonl(args.jsonl, [row])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
