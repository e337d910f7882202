"""Trains the digits classifier behind FD-digits and the classifier-guidance methods.

It is a run with a config like every other (``train/configs/digits_classifier.py``)::

    python -m train --config=train/configs/digits_classifier.py --workdir=runs/clf

writes ``runs/clf/classifier.npz`` (or ``--config.out=PATH``) and prints its held-out
accuracy and SHA-256. ``--config.noise_aware=True`` trains the noise-conditioned variant
that classifier and minority guidance need (see :mod:`jaxdiff.metrics.classifier`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdiff.data import load_digits
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.metrics.classifier import (
    P_MEAN,
    P_STD,
    DigitsClassifier,
    accuracy,
    classifier_model,
    noisy_classifier_inputs,
    save_classifier,
)
from jaxdiff.training.optim import make_optimizer
from jaxdiff.utils import storage


def _random_shift(key: jax.Array, x: jax.Array) -> jax.Array:
    """Shifts each image by up to one pixel in each direction (background -1 fills)."""
    b, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (b, 2), 0, 3)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


def train_digits_classifier(
    seed: int = 0,
    steps: int = 1500,
    noise_aware: bool = False,
    *,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    dropout: float = 0.1,
) -> Any:
    """Trains the digits classifier on the ``"train"`` split with a fixed seed.

    Adam with warm-up and cosine decay, random one-pixel shifts, dropout before the
    logits; one jitted step per batch, on one device.

    Args:
      seed: Seed of the init, batch order, augmentation and noise.
      steps: Optimizer steps.
      noise_aware: Train the noise-conditioned variant on EDM-noised inputs.
      batch_size: Images per step.
      learning_rate: Peak learning rate.
      weight_decay: Decoupled weight decay.
      dropout: Dropout before the logits.

    Returns:
      The trained (unboxed) params of ``classifier_model(noise_aware)``.
    """
    model = classifier_model(noise_aware, dropout)
    images, labels = load_digits("train")
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    rng = np.random.default_rng(seed)
    per_epoch = len(labels) // batch_size
    epochs = -(-steps // per_epoch)
    order = np.concatenate(
        [rng.permutation(len(labels))[: per_epoch * batch_size] for _ in range(epochs)]
    )
    batches = jnp.asarray(order[: steps * batch_size].reshape(steps, batch_size), jnp.int32)

    key = jax.random.key(seed)
    init_key, train_key = jax.random.split(key)
    noise0 = jnp.zeros((1,)) if noise_aware else None
    params = nn.unbox(jax.jit(model.init)(init_key, images[:1], noise0)["params"])
    tx = make_optimizer(
        learning_rate,
        warmup_steps=min(100, steps // 10),
        decay_steps=steps,
        weight_decay=weight_decay,
    )

    def loss_fn(p, x, y, key):
        shift_key, noise_key, drop_key = jax.random.split(key, 3)
        x = _random_shift(shift_key, x)
        noise_label = None
        if noise_aware:
            sig_key, n_key = jax.random.split(noise_key)
            sigma = jnp.exp(P_MEAN + P_STD * jax.random.normal(sig_key, (x.shape[0],)))
            x, noise_label = noisy_classifier_inputs(
                x + sigma[:, None, None, None] * jax.random.normal(n_key, x.shape), sigma
            )
        logits = model.apply({"params": p}, x, noise_label, train=True, rngs={"dropout": drop_key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, opt_state, idx, i):
        grads = jax.grad(loss_fn)(p, images[idx], labels[idx], jax.random.fold_in(train_key, i))
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    # A Python loop over a jitted step: XLA:CPU runs convolutions inside a scan's while
    # loop an order of magnitude slower than at the top level.
    opt_state = tx.init(params)
    for i in range(steps):
        params, opt_state = step(params, opt_state, batches[i], i)
    return jax.tree.map(np.asarray, params)


def train_classifier(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> str:
    """Trains, scores and saves the digits classifier a config describes.

    Args:
        config: ``seed``, ``steps``, ``noise_aware``, ``batch_size``, ``learning_rate``,
            ``weight_decay``, ``dropout`` and ``out`` (the ``.npz`` path; empty for
            ``workdir/classifier.npz``).
        workdir: the run directory.

    Returns:
        The path of the written file.

    Raises:
        InvalidArgumentError: for ``steps`` or ``batch_size`` below 1.
    """
    for name in ("steps", "batch_size"):
        if config[name] < 1:
            raise InvalidArgumentError(
                f"config.{name} must be >= 1, got {config[name]}: set --config.{name}=N"
            )
    out = storage.to_str(config.out or storage.join(workdir, "classifier.npz"))
    start = time.perf_counter()
    params = train_digits_classifier(
        config.seed,
        config.steps,
        config.noise_aware,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        dropout=config.dropout,
    )
    seconds = time.perf_counter() - start
    clf = DigitsClassifier(classifier_model(config.noise_aware, config.dropout), params)
    test_acc = accuracy(clf, *load_digits("test"))
    train_acc = accuracy(clf, *load_digits("train"))
    meta: dict[str, Any] = {
        "seed": config.seed,
        "steps": config.steps,
        "noise_aware": config.noise_aware,
        "train_split": "train",
        "test_accuracy": round(test_acc, 6),
        "train_accuracy": round(train_acc, 6),
        "jax_version": jax.__version__,
    }
    digest = save_classifier(out, dataclasses.replace(clf, meta=meta))
    print(
        f"trained in {seconds:.1f} s: held-out test accuracy {test_acc:.4f} (train {train_acc:.4f})"
    )
    print(f"wrote {out} ({storage.as_path(out).stat().length} bytes), SHA-256 {digest}")
    return out


__all__ = ["train_classifier", "train_digits_classifier"]
