"""Evaluation of runs: ``sample_and_evaluate`` for a loaded run and the in-loop hook.

Metrics (:mod:`jaxdiff.metrics`) only take samples or a ``generate(params, labels,
keys)`` callable; this module supplies that callable from a run and its sampler spec,
and reads ``config.eval``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from jaxdiff.experiment.generation import generate_fn
from jaxdiff.experiment.latents import decoded_generate, run_vae
from jaxdiff.experiment.runs import TrainedModel
from jaxdiff.experiment.sampling import SamplerSpec, resolve_sampler
from jaxdiff.metrics import (
    INCEPTION_FC_ENV,
    Evaluator,
    SampleEvalResult,
    get_evaluators,
    make_sample_and_evaluate_fn,
)
from jaxdiff.training.loop import Hook

EVAL_FILE_OPTIONS = (
    "fid_stats",
    "ref_batch",
    "inception_weights",
    "inception_fc",
    "dinov2_stats",
    "dinov2_weights",
)
"""File options of evaluation, the same in ``config.eval`` and ``python -m sample`` flags."""


def eval_request_problem(names: list[str], where: str = "--{}", **files: str | None) -> str:
    """Why evaluating ``names`` with these files cannot work ("" if it can), before any work.

    Shared by ``python -m sample`` (flags) and the config check (``config.eval``), so
    both name the same fix. Checks what is cheap: known, distinct names; the reference
    each metric needs; that given files exist.

    Args:
        names: Evaluator names.
        where: How an option is spelled for the user: ``"--{}"`` (flags) or
            ``"config.eval.{}"``.
        **files: The :data:`EVAL_FILE_OPTIONS` given (empty or None = not given).
    """
    from jaxdiff.metrics import EVALUATORS
    from jaxdiff.utils import storage

    if not names or len(set(names)) != len(names) or any(n not in EVALUATORS for n in names):
        return f"evaluators must be distinct names from {list(EVALUATORS)}, got {names}"
    opt = where.format
    has = {k: bool(files.get(k)) for k in EVAL_FILE_OPTIONS}
    adm = "a reference batch in ADM's .npz layout (python -m jaxdiff.metrics.reference_stats "
    adm += "--evaluator=adm, or a published one)"
    if "fid" in names and not (has["fid_stats"] or has["ref_batch"]):
        return f"fid needs {opt('fid_stats')}=<reference .npz> or {opt('ref_batch')}=<{adm}>"
    for name in ("sfid", "prec_recall", "kid"):
        if name in names and not has["ref_batch"]:
            return f"{name} needs {opt('ref_batch')}=<{adm}>"
    if "is" in names and not (has["inception_fc"] or os.environ.get(INCEPTION_FC_ENV)):
        return (
            f"is needs the Inception logits layer: {opt('inception_fc')}=<file from python -m "
            f"jaxdiff.metrics.convert_inception --fc-out=...> (or set ${INCEPTION_FC_ENV})"
        )
    if "fd_dinov2" in names and not has["dinov2_stats"]:
        return (
            f"fd_dinov2 needs {opt('dinov2_stats')}=<reference .npz from python -m "
            "jaxdiff.metrics.reference_stats --evaluator=fd_dinov2>"
        )
    for key in EVAL_FILE_OPTIONS:
        if has[key] and not storage.isfile(files[key]):
            return f"{opt(key)}={files[key]} does not exist"
    return ""


def evaluator_options(**files: str | None) -> dict[str, dict[str, Any]]:
    """Evaluator keyword arguments (by evaluator name) from the evaluation file options.

    Args:
        **files: Any of :data:`EVAL_FILE_OPTIONS` (empty or None = not given): ``fid_stats``
            (FID reference statistics), ``ref_batch`` (ADM-layout reference batch for
            sfid, prec_recall, kid and FID), ``inception_weights``, ``inception_fc`` (IS),
            ``dinov2_stats``, ``dinov2_weights``.

    Returns:
        ``{"inception": {...}, "fd_dinov2": {...}}`` for
        :func:`jaxdiff.metrics.get_evaluators`.
    """
    unknown = sorted(set(files) - set(EVAL_FILE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown evaluation options {unknown}: use {list(EVAL_FILE_OPTIONS)}")
    given = {k: v for k, v in files.items() if v}
    inception = {
        "reference_stats": given.get("fid_stats"),
        "ref_batch": given.get("ref_batch"),
        "inception_weights": given.get("inception_weights"),
        "inception_fc": given.get("inception_fc"),
    }
    dinov2 = {
        "reference_stats": given.get("dinov2_stats"),
        "dinov2_weights": given.get("dinov2_weights"),
    }
    return {"inception": inception, "fd_dinov2": dinov2}


def build_evaluator(
    name: str | list[str] | Evaluator,
    *,
    dataset: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Evaluator:
    """Evaluators by name (``"fid,is"`` or a list: one feature pass) as one evaluator.

    ``"toy"`` defaults its reference to the run's ``dataset``. ``options`` maps an
    evaluator name (or ``"inception"`` for all five Inception metrics) to its keyword
    arguments (see :func:`evaluator_options`); a flat dict of keyword arguments is taken
    as the options of a single named evaluator.
    """
    if isinstance(name, Evaluator):
        return name
    names = [n.strip() for n in name.split(",")] if isinstance(name, str) else list(name)
    opts = dict(options or {})
    if opts and len(names) == 1 and names[0] not in opts and "inception" not in opts:
        opts = {names[0]: opts}  # kwargs of the one evaluator
    if "toy" in names and dataset is not None:
        opts["toy"] = {"dataset": dataset, **opts.get("toy", {})}
    return get_evaluators(names, opts)


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
    return_samples: bool | int = False,
    vae: Any = None,
    progress: bool = False,
) -> SampleEvalResult:
    """Draws ``num`` samples from a loaded run on its mesh and evaluates them.

    Args:
        run: from :func:`jaxdiff.experiment.load_run` (its ``mesh`` decides the sharding:
            the batch is split over ``('data', 'fsdp')``).
        evaluator: an :class:`~jaxdiff.metrics.Evaluator`, a name (``"fd_digits"``,
            ``"fid"``, ``"toy"``...) or several (``"fid,sfid,is,prec_recall"``).
        num: number of samples.
        seed: sample ``j`` uses ``fold_in(key(seed), j)``.
        spec: the sampler; default the run's stored ``config.sample``.
        labels: ``[num]`` labels; default cycles the classes.
        batch_size: global samples per compiled call.
        evaluator_options: options by evaluator name (:func:`evaluator_options`), or the
            keyword arguments of a single named evaluator.
        return_samples: also return the samples (host memory: ``num`` samples), or a
            number: return only the first that many (the metric still sees all).
        vae: for a latent model, the VAE (:func:`jaxdiff.experiment.run_vae`) that decodes
            each batch to images before the metric sees it (and before they are returned).
        progress: show a progress bar of samples done (process 0, on a terminal).

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
    return fn(params, seed, return_samples, progress)


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
        config: the run's config: ``eval.name`` (one evaluator or several,
            comma-separated), ``every``, ``num``, ``batch_size``, and the reference and
            weight files of :data:`EVAL_FILE_OPTIONS` (``eval.fid_stats``...).
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
        build_evaluator(ec.name, dataset=config.data.name, options=eval_config_options(ec)),
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


def eval_config_options(ec: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """:func:`evaluator_options` from the file keys present in ``config.eval``."""
    return evaluator_options(**{k: ec.get(k) for k in EVAL_FILE_OPTIONS if k in ec})


__all__ = [
    "EVAL_FILE_OPTIONS",
    "build_evaluator",
    "eval_config_options",
    "eval_request_problem",
    "evaluator_options",
    "make_eval_hook",
    "sample_and_evaluate",
]
