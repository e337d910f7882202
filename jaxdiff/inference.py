"""Loading a trained run from its workdir and generating samples from it.

The sample CLI and notebooks use this: it needs only ``workdir/checkpoints`` (the config
is stored beside every checkpoint), never the training data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.diffusion import Formulation
from jaxdiff.generate import make_generate_fn, model_denoiser, sample_keys_for
from jaxdiff.guidance import Guidance
from jaxdiff.parallel import make_mesh
from jaxdiff.samplers import Solver
from jaxdiff.training.checkpoint import Checkpointer, load_config
from jaxdiff.training.experiment import abstract_state, build_model_parts, make_state_fns
from jaxdiff.training.loop import RUN_KEY
from jaxdiff.training.state import ema_key


@dataclasses.dataclass
class TrainedModel:
    """A restored run: its config, network, formulation and chosen params.

    Attributes:
        config: the training config.
        model: the network.
        formulation: its formulation.
        params: the chosen params (an EMA copy by default).
        num_classes: classes (0 = unconditional; null class id = ``num_classes``).
        sample_shape: shape of one sample.
        step: the checkpoint's training step.
    """

    config: ml_collections.ConfigDict
    model: nn.Module
    formulation: Formulation
    params: Any
    num_classes: int
    sample_shape: tuple[int, ...]
    step: int


def load_run(workdir: str | Path, *, ema: str | None = "default") -> TrainedModel:
    """Restores the newest checkpoint of a training run.

    Args:
        workdir: the training workdir (holding ``checkpoints/``).
        ema: which params: ``"default"`` (the first EMA rate, or the raw params if the run
            kept none), an EMA rate such as ``"0.999"``, or None for the raw params.

    Returns:
        The restored model.

    Raises:
        FileNotFoundError: if ``workdir`` holds no checkpoint (says how to train one).
        ValueError: for an EMA rate the run did not keep.
    """
    ckpt_dir = Path(workdir) / "checkpoints"
    stored = load_config(ckpt_dir) if ckpt_dir.exists() else None
    if stored is None:
        raise FileNotFoundError(
            f"no checkpoint in {ckpt_dir}: train one first with "
            f"`python -m train --workdir={workdir}`, or pass the workdir of a finished run"
        )
    meta = stored.pop(RUN_KEY)
    config = ml_collections.ConfigDict(stored)
    num_classes, shape = int(meta["num_classes"]), tuple(meta["sample_shape"])
    model, formulation, tx = build_model_parts(config, num_classes)
    mesh = make_mesh(devices=jax.devices()[:1])
    init_fn, shardings = make_state_fns(
        model, tx, mesh, shape, num_classes, tuple(config.train.ema_rates)
    )
    ckptr = Checkpointer(ckpt_dir)
    try:
        state, _, step = ckptr.restore(abstract_state(init_fn, shardings))
    finally:
        ckptr.close()
    if ema == "default":
        ema = ema_key(config.train.ema_rates[0]) if config.train.ema_rates else None
    if ema is None:
        params = state.params
    elif ema in state.ema:
        params = state.ema[ema]
    else:
        raise ValueError(f"EMA rate {ema!r} not in this run: it kept {sorted(state.ema)}")
    return TrainedModel(config, model, formulation, params, num_classes, shape, step)


def _classifier_fns(path: str | None):
    from jaxdiff.metrics.classifier import load_classifier, noisy_classifier_inputs

    clf = load_classifier(path)

    def logits_fn(x0):
        return clf.logits(x0)

    def log_prob_fn(x, sigma, y):
        x_in, label = noisy_classifier_inputs(x, sigma)
        logp = jax.nn.log_softmax(clf.logits(x_in, label))
        return jnp.take_along_axis(logp, jnp.asarray(y)[:, None], axis=1)[:, 0]

    return clf, logits_fn, log_prob_fn


def build_guidance(spec: str | None) -> Guidance | None:
    """Builds any guidance from a ``--guidance`` string.

    Beyond :func:`jaxdiff.guidance.parse_guidance`, this resolves what some methods need:

    * ``autoguidance:2.0,guide=WORKDIR`` loads the weaker guiding model from another
      run's workdir (``guide_ema=RATE|none`` picks its params);
    * ``classifier:1.0,classifier=PATH`` and ``minority:...,classifier=PATH`` use a
      noise-aware classifier file (``python -m jaxdiff.metrics.classifier --noise_aware``);
    * ``elucd:...`` and ``gfcg:...`` use a clean classifier on x0; ``classifier=PATH``
      defaults to the shipped digits classifier.

    Raises:
        ValueError: for an unknown method, bad arguments, or a missing ``guide=``.
    """
    from jaxdiff.guidance.registry import build, split_spec

    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    name, args, kwargs = split_spec(spec)
    if name == "autoguidance":
        guide = kwargs.pop("guide", None)
        if guide is None:
            raise ValueError(
                f"{spec!r}: autoguidance needs the guiding run, e.g. "
                "'autoguidance:2.0,guide=runs/digits_small'"
            )
        ema = kwargs.pop("guide_ema", "default")
        bad = load_run(str(guide), ema=None if ema is None or ema == "none" else str(ema))
        kwargs["guide_denoise"] = model_denoiser(bad.model, bad.formulation, bad.params)
    elif name in ("classifier", "minority", "elucd", "gfcg"):
        path = kwargs.pop("classifier", None)
        clf, logits_fn, log_prob_fn = _classifier_fns(None if path is None else str(path))
        if name in ("classifier", "minority"):
            if not clf.model.noise_conditioned:
                raise ValueError(
                    f"{spec!r} needs a noise-aware classifier: train one with `python -m "
                    "jaxdiff.metrics.classifier --noise_aware --out=PATH`, then add "
                    "classifier=PATH"
                )
            kwargs["log_prob_fn"] = log_prob_fn
        else:
            kwargs["logits_fn"] = logits_fn
    return build(name, args, kwargs, spec)


def parse_labels(spec: str | None, num: int, num_classes: int) -> np.ndarray:
    """Labels for ``num`` samples: ``None``/"cycle" cycles the classes, "3" or "0,1,7" repeats.

    Raises:
        ValueError: for labels outside ``[0, num_classes]`` (``num_classes`` = null class).
    """
    if num_classes == 0:
        return np.zeros(num, np.int32)
    if spec in (None, "", "cycle"):
        return (np.arange(num) % num_classes).astype(np.int32)
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--labels must be integers like '0,1,7', got {spec!r}") from err
    if not values or min(values) < 0 or max(values) > num_classes:
        raise ValueError(
            f"labels {spec!r} out of range: use 0..{num_classes - 1} ({num_classes} = null class)"
        )
    return np.resize(np.asarray(values, np.int32), num)


def generate_samples(
    run: TrainedModel,
    *,
    num: int,
    solver: Solver,
    sigmas: Any,
    guidance: Guidance | None,
    labels: np.ndarray,
    seed: int,
    batch_size: int = 256,
) -> tuple[np.ndarray, int]:
    """Draws ``num`` samples in batches; sample ``j`` is seeded by ``fold_in(key(seed), j)``.

    Returns:
        ``(samples [num, ...] float32, nfe per sample)``.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    if guidance is not None and run.num_classes == 0:
        raise ValueError("guidance needs a class-conditional model; this one is unconditional")
    generate = jax.jit(
        make_generate_fn(
            run.model,
            run.formulation,
            solver=solver,
            sigmas=sigmas,
            guidance=guidance,
            sample_shape=run.sample_shape,
            num_classes=run.num_classes,
        )
    )
    key = jax.random.key(seed)
    out, nfe = [], 0
    for start in range(0, num, batch_size):
        count = min(batch_size, num - start)
        keys = sample_keys_for(key, start, count)
        lab = jnp.asarray(labels[start : start + count])
        x, aux = generate(run.params, lab, keys)
        out.append(np.asarray(x))
        nfe = int(aux["nfe"])
    return np.concatenate(out), nfe
