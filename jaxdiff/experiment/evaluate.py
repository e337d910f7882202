"""Evaluation of runs: ``sample_and_evaluate`` for a loaded run and the in-loop hook.

Metrics (:mod:`jaxdiff.metrics`) only take samples or a ``generate(params, labels,
keys)`` callable; this module supplies that callable from a run and its sampler spec,
and reads ``config.eval``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from jaxdiff.experiment.generation import generate_fn
from jaxdiff.experiment.latents import decoded_generate, run_vae
from jaxdiff.experiment.runs import TrainedModel
from jaxdiff.experiment.sampling import SamplerSpec, resolve_sampler
from jaxdiff.metrics import Evaluator, SampleEvalResult, get_evaluator, make_sample_and_evaluate_fn
from jaxdiff.training.loop import Hook


def build_evaluator(
    name: str | Evaluator, *, dataset: str | None = None, options: Mapping[str, Any] | None = None
) -> Evaluator:
    """An evaluator by name; ``"toy"`` defaults its reference to the run's ``dataset``."""
    if isinstance(name, Evaluator):
        return name
    kwargs = dict(options or {})
    if name == "toy" and dataset is not None:
        kwargs.setdefault("dataset", dataset)
    return get_evaluator(name, **kwargs)


def _labels(num: int, num_classes: int, labels: Any) -> np.ndarray | None:
    if num_classes == 0:
        return None
    return (np.arange(num) % num_classes).astype(np.int32) if labels is None else labels


def sample_and_evaluate(
    run: TrainedModel,
    evaluator: str | Evaluator,
    num: int,
    seed: int,
    *,
    spec: SamplerSpec | None = None,
    labels: Any = None,
    batch_size: int = 256,
    evaluator_options: Mapping[str, Any] | None = None,
    return_samples: bool = False,
    vae: Any = None,
) -> SampleEvalResult:
    """Draws ``num`` samples from a loaded run on its mesh and evaluates them.

    Args:
        run: from :func:`jaxdiff.experiment.load_run` (its ``mesh`` decides the sharding:
            the batch is split over ``('data', 'fsdp')``).
        evaluator: an :class:`~jaxdiff.metrics.Evaluator` or a name (``"fd_digits"``,
            ``"fid"``, ``"toy"``).
        num: number of samples.
        seed: sample ``j`` uses ``fold_in(key(seed), j)``.
        spec: the sampler; default the run's stored ``config.sample``.
        labels: ``[num]`` labels; default cycles the classes.
        batch_size: global samples per compiled call.
        evaluator_options: options for :func:`jaxdiff.metrics.get_evaluator`.
        return_samples: also return the samples (host memory: ``num`` samples).
        vae: for a latent model, the VAE (:func:`jaxdiff.experiment.run_vae`) that decodes
            each batch to images before the metric sees it (and before they are returned).

    Example:
        >>> run = load_run("runs/digits", mesh=make_mesh())  # doctest: +SKIP
        >>> sample_and_evaluate(run, "fd_digits", 2000, seed=0).metrics  # doctest: +SKIP
    """
    if spec is None:
        spec = resolve_sampler(run.config.sample, num_classes=run.num_classes)
    generate, params, shardings = decoded_generate(generate_fn(run, spec), run, vae)
    dataset = run.config.data.name if "data" in run.config else None
    fn = make_sample_and_evaluate_fn(
        generate,
        build_evaluator(evaluator, dataset=dataset, options=evaluator_options),
        mesh=run.mesh,
        num=num,
        labels=_labels(num, run.num_classes, labels),
        batch_size=batch_size,
        param_shardings=shardings,
    )
    return fn(params, seed, return_samples)


def make_eval_hook(
    config: ml_collections.ConfigDict,
    run: TrainedModel,
    spec: SamplerSpec,
    params_of: Any,
) -> Hook | None:
    """The in-loop evaluation of ``config.eval``, or None when it is off.

    Every ``config.eval.every`` steps (and at the last) the hook draws ``config.eval.num``
    samples with ``spec`` and writes ``eval/<metric>`` scalars. The sampler and features
    compile once, here.

    Args:
        config: the run's config (``eval.name``, ``every``, ``num``, ``batch_size``).
        run: the model side of the run being trained (``params`` unused).
        spec: the run's sampler spec.
        params_of: ``state -> params`` to evaluate (e.g. the first EMA).
    """
    ec = config.get("eval")
    if ec is None or not ec.name or not ec.every:
        return None
    # A latent run with config.vae.path set is evaluated on decoded images.
    vae = run_vae(run, config.get("vae", {}).get("path"))
    generate, _, shardings = decoded_generate(generate_fn(run, spec), run, vae)
    fn = make_sample_and_evaluate_fn(
        generate,
        build_evaluator(ec.name, dataset=config.data.name),
        mesh=run.mesh,
        num=int(ec.num),
        labels=_labels(int(ec.num), run.num_classes, None),
        batch_size=int(ec.batch_size),
        param_shardings=shardings,
    )

    def evaluate(step: int, state: Any) -> dict[str, float]:
        del step
        params = params_of(state) if vae is None else (params_of(state), vae.params)
        scores = fn(params, config.seed + 2).metrics
        return {f"eval/{k}": v for k, v in scores.items()}

    return Hook("evaluate", int(ec.every), evaluate)


__all__ = ["build_evaluator", "make_eval_hook", "sample_and_evaluate"]
